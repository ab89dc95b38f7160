"""OpenRLHF's remote reward model protocol on a real gateway process over real RM services:
sticky per-prompt routes, scores in [0, 1], feedback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.openrlhf import OpenRLHFRequest, StickyRoute, StickyRoutes, bt_probability
from tests.gateway.helpers import gateway_config, start_gateway


@pytest.fixture(scope="module")
def rlhf_gateway(
    tmp_path_factory: pytest.TempPathFactory, trainer_rms: dict[str, str]
) -> Iterator[str]:
    """The real gateway process (``python -m gateway serve``), which mounts ``/get_reward``."""
    root: Path = tmp_path_factory.mktemp("openrlhf-gw")
    cfg = gateway_config(root, trainer_rms, policy={"name": "bayesian-no-offline"})
    proc = start_gateway(cfg)
    try:
        yield proc.url
    finally:
        proc.kill()


def _reward(url: str, body: dict[str, Any], ns: str) -> dict[str, Any]:
    # OpenRLHF cannot create a namespace; its operator does (or lists it in startup_namespaces).
    httpx.post(f"{url}/v1/namespaces/{ns}", timeout=60).raise_for_status()
    r = httpx.post(f"{url}/get_reward", params={"namespace": ns}, json=body, timeout=60)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_one_sample_per_call_is_sticky_per_prompt(rlhf_gateway: str) -> None:
    ns = "rlhf-one"
    prompt = "Q: what is 6*7?\nA:"
    samples = [" 42", " it is 41, I think, or maybe something else", " 42!", " 40"]
    outs = [
        _reward(rlhf_gateway, {"query": [prompt + s], "prompts": [prompt], "labels": ["42"]}, ns)
        for s in samples
    ]
    assert all(len(o["rewards"]) == 1 and o["rewards"] == o["scores"] for o in outs)
    assert all(0.0 <= o["rewards"][0] <= 1.0 for o in outs)
    # one routing decision for the prompt: the same route id and RM for every sample
    assert len({o["route_ids"][0] for o in outs}) == 1
    assert len({o["extra_logs"]["rm_index"][0] for o in outs}) == 1
    assert outs[0]["rewards"] == [0.5] and outs[0]["extra_logs"]["sticky"] == [0.0]
    assert all(o["extra_logs"]["sticky"] == [1.0] for o in outs[1:])
    rm = ["length", "verifier"][int(outs[0]["extra_logs"]["rm_index"][0])]
    if rm == "verifier":  # right answers tie the anchor, the wrong ones lose
        assert [o["rewards"][0] for o in outs] == [
            0.5,
            pytest.approx(bt_probability(0, 1)),
            0.5,
            pytest.approx(bt_probability(0, 1)),
        ]
    else:  # the length RM prefers the longer sample; equal lengths tie the anchor
        assert outs[1]["rewards"][0] > 0.5 and outs[3]["rewards"][0] == 0.5


def test_batch_with_many_prompts_and_feedback(rlhf_gateway: str) -> None:
    ns = "rlhf-batch"
    prompts = [f"prompt {i % 3}: " for i in range(9)]
    body = {"query": [p + "x" * (i + 1) for i, p in enumerate(prompts)], "prompts": prompts}
    out = _reward(rlhf_gateway, body, ns)
    assert len(out["rewards"]) == 9
    by_prompt: dict[str, set[str]] = {}
    for p, rid in zip(prompts, out["route_ids"], strict=True):
        by_prompt.setdefault(p, set()).add(rid)
    assert all(len(v) == 1 for v in by_prompt.values()) and len(by_prompt) == 3
    # feedback per prompt route goes through /v1/feedback like any route
    ids = sorted({rid for v in by_prompt.values() for rid in v})
    fb = httpx.post(
        f"{rlhf_gateway}/v1/feedback",
        json={"feedback": [{"route_id": r, "reward": -0.3} for r in ids]},
        timeout=30,
    ).json()
    assert fb["applied"] == 3
    post = httpx.get(f"{rlhf_gateway}/v1/posteriors", params={"namespace": ns}).json()
    assert sum(r["observations"] for r in post["rms"]) == 3


def test_bad_requests_name_the_field(rlhf_gateway: str) -> None:
    for body, field in [({"query": []}, "query"), ({"query": ["a"], "prompts": ["a", "b"]},
                                                     "prompts")]:  # fmt: skip
        r = httpx.post(f"{rlhf_gateway}/get_reward", json=body, timeout=30)
        assert r.status_code == 422
        assert field in r.json()["error"]["message"]


def test_pure_parts() -> None:
    req = OpenRLHFRequest(query=["a"], labels=[3])
    assert req.prompts is None and req.labels == [3]
    assert bt_probability(-1000.0, 0.0) == 0.0 and bt_probability(1000.0, 0.0) == 1.0
    s = StickyRoutes(max_entries=1)
    s.put(("n", "a"), StickyRoute("r1", "x", "anchor"))
    s.put(("n", "b"), StickyRoute("r2", "x", "anchor"))
    assert s.get(("n", "a")) is None and s.get(("n", "b")) is not None
