"""Gold audits on /v1/route, on a real gateway over each store (memory, SQLite, Redis): a seeded
share of routed pairs is also labelled by the namespace's audit RM, and agreement is a
correctness observation of the routed RM, applied exactly once beside the trainer's feedback."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.audits import share
from gateway.offline.model import OfflineRouter
from gateway.store import AUDIT_SUFFIX
from tests.gateway.conftest import RMPoolProcs
from tests.gateway.helpers import (
    build_router,
    feedback,
    gateway_config,
    pairs,
    posteriors,
    route,
    start_gateway,
    start_rm,
)
from tests.procs import Proc, free_port, start_redis

#: The gateway's RMs: the session's pool plus ``judge``, this module's own length RM (the
#: auditor), which a test may kill; ``len-b`` is flagged as needing a reference.
NAMES = ["len-a", "len-b", "tiny-bert", "judge"]


@dataclass
class Gateway:
    config: Path
    proc: Proc
    judge: Proc
    router: Path
    store: str

    @property
    def url(self) -> str:
        return self.proc.url

    def restart(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown hook runs
        self.proc = start_gateway(self.config)


@pytest.fixture(scope="module", params=["memory", "sqlite", "redis"])
def gw(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, rm_pool: RMPoolProcs
) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp(f"gw-audit-{request.param}")
    judge = start_rm(root, "judge", backend="length")
    router = build_router(root, NAMES)
    urls = {**{n: rm_pool.urls[n] for n in NAMES[:3]}, "judge": judge.url}
    # A snapshot every 7 observations: a restart loads one and folds only the log's tail.
    extra: dict[str, Any] = {"snapshot_every": 7}
    redis = None
    if request.param == "sqlite":
        extra["store_path"] = str(root / "state.db")
    elif request.param == "redis":
        (root / "redis").mkdir()
        redis = start_redis(free_port(), root / "redis")
        extra["redis_url"] = f"redis://127.0.0.1:{redis.port}/0"
    config = gateway_config(root, urls, router=router, **extra)
    text = config.read_text().replace("name: len-b\n", "name: len-b\n  needs_reference: true\n")
    config.write_text(text)
    g = Gateway(config, start_gateway(config), judge, router, request.param)
    try:
        yield g
    finally:
        g.proc.kill()
        g.judge.kill()
        if redis is not None:
            redis.kill()


def _create(url: str, ns: str, **config: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/namespaces/{ns}", json=config, timeout=30)


def _audited(url: str, ns: str, rate: float, **config: Any) -> dict[str, Any]:
    """Create ``ns``: best-single on tiny-bert (never the auditor), audited by ``judge`` at
    ``rate`` with the calls budget for it; ``config`` overrides. Returns its stored config."""
    base = {"policy": "best-single", "best_rm": "tiny-bert", "audit_rm": "judge"}
    body = {**base, "audit_rate": rate, "max_calls_per_pair": 1.0 + rate, **config}
    r = _create(url, ns, **body)
    assert r.status_code == 200, r.text
    stored: dict[str, Any] = r.json()["config"]
    return stored


def _metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"reward_router_gateway_{name}_total\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _uid(route_id: str) -> str:
    return route_id.rsplit(":", 1)[-1]


def test_the_audited_share_is_the_seeded_hash_of_the_route_id(gw: Gateway) -> None:
    ns = "share"
    _audited(gw.url, ns, 0.25, audit_accuracy=0.9)
    res = [x for k in range(3) for x in route(gw.url, pairs(100, 100 * k), ns)["results"]]
    audited = {x["route_id"] for x in res if x["audited_by"] == "judge"}
    # Exactly the routes whose uid hashes (seed 0, the gateway's) below the rate.
    assert audited == {x["route_id"] for x in res if share(0, _uid(x["route_id"])) < 0.25}
    # Route uids are random, so the share is Binomial(300, 0.25)/300 (sd 0.025): ±4.4 sd.
    assert 0.14 <= len(audited) / len(res) <= 0.36
    assert all(x["rm"] == "tiny-bert" and x["audited_by"] in (None, "judge") for x in res)
    assert _metric(gw.url, "audit_calls", namespace=ns, outcome="ok") == len(audited)
    recorded = sum(
        _metric(gw.url, "audits", namespace=ns, rm="tiny-bert", result=k)
        for k in ("agree", "disagree", "tie")
    )
    skipped = _metric(gw.url, "audit_skips", namespace=ns, reason="auditor_tie")
    assert recorded + skipped == len(audited) and recorded > 0
    # best-single does not learn, but the audits are observations in the log all the same.
    obs = {p["name"]: p["observations"] for p in posteriors(gw.url, ns, full=False)["rms"]}
    assert obs["tiny-bert"] == recorded


def _precision_trace(url: str, ns: str) -> np.ndarray:
    prec = np.array(posteriors(url, ns)["params"]["precision"])
    return np.trace(prec, axis1=1, axis2=2)


def test_an_audit_is_a_correctness_observation_beside_the_trainers_feedback(gw: Gateway) -> None:
    """On a −DPO namespace an audit counts as one correctness observation (weight (2p − 1)²),
    the trainer's feedback for the same route as 12 σ² β²; both apply, each exactly once."""
    ns = "scale"
    cfg = {"policy": "bayesian", "reward": "dpo", "dpo_informativeness": 0.1}
    r = _create(gw.url, ns, **cfg, audit_rate=1.0, audit_rm="judge", max_calls_per_pair=2.0)
    assert r.status_code == 200, r.text
    # No accuracy given: the router's training accuracy of the auditor, pinned in the config
    # (or a 422 naming audit_accuracy when that accuracy is no better than a coin).
    fit = OfflineRouter.load(gw.router).prior_fit
    p = r.json()["config"]["audit_accuracy"]
    assert p == (round(fit.intercepts[NAMES.index("judge")], 4) if fit is not None else 1.0)
    before = _precision_trace(gw.url, ns)
    res = route(gw.url, pairs(60), ns)["results"]
    recorded = [x for x in res if x["audited_by"] == "judge" and x["rm"] != "judge"]
    assert recorded and all(x["rm"] != "judge" for x in recorded)
    after_audits = _precision_trace(gw.url, ns)
    post = posteriors(gw.url, ns, full=False)["rms"]
    assert sum(x["observations"] for x in post) == len(recorded)  # the length RMs never tie here
    # The trainer's feedback for the audited routes, on the same RMs and contexts.
    got = feedback(gw.url, [(x["route_id"], -0.4 - 0.01 * i) for i, x in enumerate(recorded)])
    assert got == {"applied": len(recorded), "duplicate": 0, "unknown": 0}
    after_feedback = _precision_trace(gw.url, ns)
    sigma2 = fit.sigma2 if fit is not None else 0.25
    w_dpo = round(sigma2 * 0.1**2 * 12.0, 12)
    d_audit, d_dpo = after_audits - before, after_feedback - after_audits
    moved = d_dpo > 0
    assert moved.any()
    np.testing.assert_allclose(d_audit[moved] / d_dpo[moved], (2 * p - 1) ** 2 / w_dpo, rtol=1e-6)
    assert np.all(d_audit[~moved] == 0)
    # Exactly once: the trainer's feedback again is a duplicate; an audit's own id is the
    # gateway's to apply, never a trainer's (unknown, whatever the value).
    again = [(x["route_id"], -0.4) for x in recorded]
    again += [(x["route_id"] + AUDIT_SUFFIX, 1.0) for x in recorded]
    assert feedback(gw.url, again) == {
        "applied": 0,
        "duplicate": len(recorded),
        "unknown": len(recorded),
    }
    post = posteriors(gw.url, ns)
    assert sum(x["observations"] for x in post["rms"]) == 2 * len(recorded)
    assert post["seq"] == 2 * len(recorded)
    if gw.store == "memory":
        return
    # SIGKILL and restart: the posterior is folded again from the store's log (audit entries
    # included) to the same state.
    gw.restart()
    again_post = posteriors(gw.url, ns)
    assert again_post["seq"] == post["seq"]
    np.testing.assert_allclose(
        again_post["params"]["precision"], post["params"]["precision"], rtol=1e-9, atol=1e-9
    )
    np.testing.assert_allclose(again_post["params"]["eta"], post["params"]["eta"], atol=1e-9)


def test_an_auditor_that_needs_a_reference_audits_only_pairs_that_have_one(gw: Gateway) -> None:
    ns = "ref-audit"
    # A verifier's labels are checked ones: its accuracy defaults to 1.
    assert _audited(gw.url, ns, 1.0, audit_rm="len-b")["audit_accuracy"] == 1.0
    plain = pairs(5)
    blank = [{**x, "reference": "  "} for x in pairs(2, offset=10)]  # blank text is none
    with_ref = [{**x, "reference": "42"} for x in pairs(5, offset=5)]
    res = route(gw.url, plain + blank + with_ref, ns)["results"]
    assert [x["audited_by"] for x in res] == [None] * 7 + ["len-b"] * 5
    assert _metric(gw.url, "audit_skips", namespace=ns, reason="no_reference") == 7


def test_a_down_auditor_never_fails_the_route(gw: Gateway) -> None:
    ns = "auditor-down"
    _audited(gw.url, ns, 1.0, audit_accuracy=0.8)
    port = gw.judge.port
    gw.judge.kill()
    try:
        for k in range(3):  # asked while still thought healthy, then skipped as unavailable
            res = route(gw.url, pairs(8, 8 * k), ns)["results"]
            assert all(x["rm"] == "tiny-bert" and x["audited_by"] is None for x in res)
        assert _metric(gw.url, "audit_skips", namespace=ns, reason="unavailable") == 24
        assert posteriors(gw.url, ns, full=False)["seq"] == 0
    finally:
        gw.judge = start_rm(gw.config.parent, "judge", backend="length", port=port)
        # Until the gateway has the auditor back (health check, cooldown): the next tests audit.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rms = httpx.get(f"{gw.url}/readyz", timeout=30).json()["rms"]
            if rms["judge"] is True:
                break
            time.sleep(0.25)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"audit_rate": 0.05, "audit_rm": "nobody", "max_calls_per_pair": 1.05}, "audit_rm"),
        ({"audit_rate": 1.5, "audit_rm": "judge", "max_calls_per_pair": 2.0}, "audit_rate"),
        ({"audit_rate": -0.1, "audit_rm": "judge"}, "audit_rate"),
        ({"audit_rate": 0.05, "audit_rm": "judge"}, "audit_rate"),  # no calls budget for it
        ({"audit_rate": 0.05, "max_calls_per_pair": 1.05}, "audit_rm"),
        (
            {"audit_rate": 0.05, "audit_rm": "judge", "max_calls_per_pair": 1.05,
             "audit_accuracy": 0.5},
            "audit_accuracy",
        ),
        (
            {"policy": "majority", "audit_rate": 0.05, "audit_rm": "judge",
             "max_calls_per_pair": 1.05, "audit_accuracy": 0.9},
            "audit_rate",
        ),
        (
            {"policy": "bayesian-paper", "reward": "dpo", "audit_rate": 0.05,
             "audit_rm": "judge", "max_calls_per_pair": 1.05, "audit_accuracy": 0.9},
            "audit_rate",
        ),
        (
            {"policy": "laser", "reward": "correct", "audit_rate": 0.05,
             "audit_rm": "judge", "max_calls_per_pair": 1.05, "audit_accuracy": 0.9},
            "audit_rate",
        ),  # laser counts every reward fully: it cannot weigh an audit
    ],
)  # fmt: skip
def test_bad_audit_settings_are_a_422_naming_the_field(
    gw: Gateway, config: dict[str, Any], field: str
) -> None:
    if gw.store != "memory":
        pytest.skip("validation happens before the store is touched: one store is enough")
    r = _create(gw.url, "bad-audit", **config)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"].split(".")[-1] == field, r.text
    listed = httpx.get(f"{gw.url}/v1/namespaces", timeout=30).json()["namespaces"]
    assert "bad-audit" not in listed


def test_audits_and_second_opinions_share_the_calls_budget(gw: Gateway) -> None:
    if gw.store != "memory":
        pytest.skip("the budget is this replica's count, whatever the store")
    ns = "budget"
    _audited(gw.url, ns, 0.25, best_rm="len-a", audit_accuracy=0.9, max_calls_per_pair=1.5)
    # len-a ties on every one of these pairs, so each would take a second opinion.
    tied = [
        {"prompt": f"question #{i}", "response_a": "yes it is", "response_b": "no it isnt"}
        for i in range(40)
    ]
    res = route(gw.url, tied, ns)["results"]
    audits = _metric(gw.url, "audit_calls", namespace=ns)
    seconds = _metric(gw.url, "second_opinions", namespace=ns)
    assert audits == sum(x["audited_by"] == "judge" for x in res) > 0
    assert seconds == sum(bool(x["rms"]) for x in res)
    assert audits + seconds == 0.5 * len(tied)  # the whole extra budget, audits first
