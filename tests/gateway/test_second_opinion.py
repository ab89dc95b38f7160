"""A budgeted second opinion (max_calls_per_pair) and the reward link, on a real gateway."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.gateway.conftest import RMPoolProcs
from tests.gateway.helpers import (
    build_router,
    feedback,
    gateway_config,
    posteriors,
    route,
    start_gateway,
)
from tests.procs import Proc

#: The length RM ties on these (same word count); the tiny BERT RM does not.
TIED = [("question one", "yes it is", "no it isnt"), ("question two", "one two", "three four")]


def tied_pairs(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        prompt, a, b = TIED[i % 2]
        out.append({"prompt": f"{prompt} #{i}", "response_a": a, "response_b": b})
    return out


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, rm_pool: RMPoolProcs) -> Iterator[Proc]:
    # RM order len-a, tiny-bert, len-b (the router's order is the gateway's): best-single on
    # len-a has tiny-bert next.
    names = ["len-a", "tiny-bert", "len-b"]
    root = tmp_path_factory.mktemp("gw-second")
    router = build_router(root, names)
    urls = {n: rm_pool.urls[n] for n in names}
    proc = start_gateway(gateway_config(root, urls, router=router))
    try:
        yield proc
    finally:
        proc.kill()


def _create(url: str, ns: str, **config: object) -> None:
    r = httpx.post(f"{url}/v1/namespaces/{ns}", json=config, timeout=30)
    assert r.status_code in (200, 201), r.text


def test_a_tie_gets_a_second_opinion_within_the_budget(gw: Proc) -> None:
    _create(gw.url, "second", policy="best-single", best_rm="len-a", max_calls_per_pair=1.5)
    res = route(gw.url, tied_pairs(10), ns="second")["results"]
    asked_twice = [x for x in res if x["rms"]]
    # Budget: 0.5 extra calls per pair routed, so 5 of the 10 ties are asked again.
    assert len(asked_twice) == 5
    for x in asked_twice:
        assert x["rms"] == ["len-a", "tiny-bert"]
        assert x["rm"] == "tiny-bert" and x["preferred"] != "tie" and not x["fallback"]
    for x in res:
        if not x["rms"]:
            assert x["rm"] == "len-a" and x["preferred"] == "tie"
    # Feedback lands on the RM whose label was returned.
    assert feedback(gw.url, [(x["route_id"], 1.0) for x in res])["applied"] == 10
    obs = {p["name"]: p["observations"] for p in posteriors(gw.url, "second")["rms"]}
    assert obs == {"len-a": 5, "tiny-bert": 5, "len-b": 0}
    text = httpx.get(f"{gw.url}/metrics", timeout=30).text
    assert 'reward_router_gateway_second_opinions_total{namespace="second"} 5.0' in text


def test_without_a_budget_a_tie_stays_a_tie(gw: Proc) -> None:
    _create(gw.url, "single", policy="best-single", best_rm="len-a")
    res = route(gw.url, tied_pairs(4), ns="single")["results"]
    assert all(x["rm"] == "len-a" and x["preferred"] == "tie" and not x["rms"] for x in res)


def _moved(url: str, ns: str, reward: float) -> float:
    res = route(url, tied_pairs(4), ns=ns)["results"]
    before = np.array(posteriors(url, ns)["params"]["means"])
    assert feedback(url, [(x["route_id"], reward) for x in res])["applied"] == 4
    after = np.array(posteriors(url, ns)["params"]["means"])
    return float(np.abs(after - before).max())


def test_dpo_rewards_move_the_posterior_less_than_correctness(gw: Proc) -> None:
    """The link: a −DPO-loss observation is worth 12 sigma2 beta^2 correctness observations."""
    _create(gw.url, "as-correct", policy="bayesian", normalizer="none", reward="correct")
    _create(
        gw.url,
        "as-dpo",
        policy="bayesian",
        normalizer="quantile",
        normalizer_params={"warmup": 0, "window": 64},
        reward="dpo",
        dpo_informativeness=0.1,
    )
    correct = _moved(gw.url, "as-correct", 1.0)
    dpo = _moved(gw.url, "as-dpo", -0.3)  # equal raw rewards: quantile 0.5, the link's centre
    assert correct > 0 and dpo < correct / 5
    r = httpx.post(
        f"{gw.url}/v1/namespaces/bad-link", json={"normalizer": "none", "reward": "dpo"}, timeout=30
    )
    assert r.status_code == 422 and "reward" in r.text
