"""RMs that need a reference (a verifier) are skipped for pairs without one, kept for the rest."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import yaml

from tests.gateway.conftest import RMPoolProcs
from tests.gateway.helpers import (
    feedback,
    gateway_config,
    pairs,
    posteriors,
    route,
    start_gateway,
    write_yaml,
)
from tests.procs import Proc


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, rm_pool: RMPoolProcs) -> Iterator[Proc]:
    # len-a is flagged as an RM that can only abstain without the pair's reference.
    rms = [
        {"name": n, "url": u, "read_timeout_s": 20.0, "needs_reference": n == "len-a"}
        for n, u in rm_pool.urls.items()
    ]
    cfg = gateway_config(
        tmp_path_factory.mktemp("gw-ref"), rm_pool.urls, policy={"name": "bayesian-no-offline"}
    )
    write_yaml(cfg, {**yaml.safe_load(cfg.read_text()), "rms": rms})
    proc = start_gateway(cfg)
    try:
        yield proc
    finally:
        proc.kill()


def test_pairs_without_a_reference_skip_the_rm_that_needs_one(gw: Proc) -> None:
    r = httpx.post(
        f"{gw.url}/v1/namespaces/ref", json={"policy": "best-single", "best_rm": "len-a"}
    )
    assert r.status_code in (200, 201), r.text
    plain = pairs(6)
    with_ref = [{**p, "reference": "42"} for p in pairs(4, offset=6)]
    res = route(gw.url, plain + with_ref, ns="ref")["results"]
    # best-single always draws len-a first; without a reference the next RM answers instead,
    # and that is the policy's choice for the pair, not a fallback after a failure.
    assert all(x["rm"] != "len-a" and not x["fallback"] for x in res[:6])
    assert all(x["rm"] == "len-a" and not x["fallback"] for x in res[6:])
    # Feedback lands on the RM that answered.
    assert feedback(gw.url, [(x["route_id"], -0.5) for x in res])["applied"] == 10
    obs = {p["name"]: p["observations"] for p in posteriors(gw.url, "ref")["rms"]}
    assert obs["len-a"] == 4 and sum(obs.values()) == 10
