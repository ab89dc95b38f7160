"""Two real gateway replicas on one real redis-server, real RM services: exactly-once feedback
across replicas, identical posteriors, kill -9 of a gateway, a Redis restart, an RM killed."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.gateway.conftest import RMPoolProcs
from tests.gateway.helpers import (
    create_namespace,
    feedback,
    gateway_config,
    pairs,
    posteriors,
    route,
    start_gateway,
)
from tests.procs import Proc, free_port, start_redis


@dataclass
class Cluster:
    redis: Proc
    redis_dir: Path
    a: Proc
    b: Proc
    a_config: Path

    def restart_redis(self) -> None:
        self.redis.kill(signal.SIGKILL)
        self.redis = start_redis(self.redis.port, self.redis_dir)

    def restart_a(self) -> None:
        self.a.kill(signal.SIGKILL)
        self.a = start_gateway(self.a_config)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, router_dir: Path, rm_pool: RMPoolProcs
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    redis_dir = root / "redis"
    redis_dir.mkdir()
    redis = start_redis(free_port(), redis_dir)
    url = f"redis://127.0.0.1:{redis.port}/0"
    common: dict[str, Any] = {
        "router": router_dir,
        "redis_url": url,
        "policy": {"name": "bayesian", "params": {"lambda0": 1.0, "sigma2": 0.25}},
        "snapshot_every": 7,  # so a restart starts from a snapshot and folds only the tail
    }
    cfg_a = gateway_config(root, rm_pool.urls, **common)
    cfg_b = gateway_config(root, rm_pool.urls, **common)
    started: list[Proc] = [redis]
    try:
        started.append(start_gateway(cfg_a))
        started.append(start_gateway(cfg_b))
        c = Cluster(redis, redis_dir, started[1], started[2], cfg_a)
        yield c
        started = [c.a, c.b, c.redis]  # the restarted ones
    finally:
        for p in started:
            p.kill()


def assert_same_posterior(p: dict[str, Any], q: dict[str, Any]) -> None:
    assert p["seq"] == q["seq"]
    for key in ("means", "eta", "precision"):
        np.testing.assert_allclose(
            np.array(p["params"][key]), np.array(q["params"][key]), rtol=0, atol=1e-9
        )
    assert [r["observations"] for r in p["rms"]] == [r["observations"] for r in q["rms"]]


def test_feedback_is_applied_once_across_replicas(cluster: Cluster) -> None:
    ns = "once"
    on_a = route(cluster.a.url, pairs(20), ns=ns)["results"]
    on_b = route(cluster.b.url, pairs(20, offset=20), ns=ns)["results"]
    rng = np.random.default_rng(1)
    items = [(x["route_id"], float(-rng.exponential())) for x in on_a + on_b]
    # Every feedback goes to both replicas at once, in small batches, from several threads.
    urls = (cluster.a.url, cluster.b.url)
    jobs = [(url, items[i : i + 5]) for i in range(0, 40, 5) for url in urls]
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda j: feedback(*j), jobs))
    assert sum(o["applied"] for o in outs) == 40
    assert sum(o["duplicate"] for o in outs) == 40
    assert sum(o["unknown"] for o in outs) == 0
    pa, pb = posteriors(cluster.a.url, ns), posteriors(cluster.b.url, ns)
    assert pa["seq"] == 40 and sum(r["observations"] for r in pa["rms"]) == 40
    assert_same_posterior(pa, pb)
    answered: dict[str, int] = {}
    for x in on_a + on_b:
        answered[x["rm"]] = answered.get(x["rm"], 0) + 1
    assert {r["name"]: r["routes"] for r in pa["rms"] if r["routes"]} == answered
    assert {r["name"]: r["observations"] for r in pa["rms"] if r["observations"]} == answered
    # The posterior moved away from the prior (uncertainty 1/sqrt(lambda0) = 1): it learned.
    assert all(r["uncertainty"] < 1.0 for r in pa["rms"] if r["observations"])


def test_kill_9_after_ack_then_restart_gives_the_same_posterior(cluster: Cluster) -> None:
    ns = "crash"
    res = route(cluster.a.url, pairs(30, offset=100), ns=ns)["results"]
    rewards = np.linspace(-2.0, -0.05, 30)
    for start in (0, 10, 20):
        batch = [(res[i]["route_id"], float(rewards[i])) for i in range(start, start + 10)]
        assert feedback(cluster.a.url, batch)["applied"] == 10
    cluster.restart_a()  # kill -9 right after the last 200, then start again
    after = posteriors(cluster.a.url, ns)
    never_crashed = posteriors(cluster.b.url, ns)
    assert after["seq"] == 30
    assert 0 < after["snapshot_seq"] <= 30  # rebuilt from a snapshot + the log after it
    assert_same_posterior(after, never_crashed)
    # and the restarted replica keeps serving the namespace from that state
    more = route(cluster.a.url, pairs(3, offset=200), ns=ns)["results"]
    assert feedback(cluster.b.url, [(x["route_id"], -0.5) for x in more])["applied"] == 3
    assert_same_posterior(posteriors(cluster.a.url, ns), posteriors(cluster.b.url, ns))


def test_redis_restart_loses_no_acknowledged_feedback(cluster: Cluster) -> None:
    ns = "redis-restart"
    res = route(cluster.a.url, pairs(20, offset=300), ns=ns)["results"]
    assert feedback(cluster.b.url, [(x["route_id"], -0.3) for x in res[:10]])["applied"] == 10
    cluster.restart_redis()  # kill -9 and start again on the same port and AOF dir
    # The gateways reconnect by themselves; the first call after the restart just works.
    assert feedback(cluster.a.url, [(x["route_id"], -0.6) for x in res[10:]])["applied"] == 10
    assert feedback(cluster.b.url, [(x["route_id"], -0.6) for x in res])["duplicate"] == 20
    pa, pb = posteriors(cluster.a.url, ns), posteriors(cluster.b.url, ns)
    assert pa["seq"] == 20
    assert_same_posterior(pa, pb)
    assert httpx.get(f"{cluster.b.url}/readyz").json()["store"] is True


def test_reset_on_one_replica_is_seen_by_the_other(cluster: Cluster) -> None:
    ns = "reset-x"
    res = route(cluster.a.url, pairs(6, offset=600), ns=ns)["results"]
    assert feedback(cluster.a.url, [(x["route_id"], -0.5) for x in res[:3]])["applied"] == 3
    assert posteriors(cluster.a.url, ns)["seq"] == 3
    r = httpx.post(f"{cluster.b.url}/v1/namespaces/{ns}/reset")  # no admin key configured
    assert r.status_code == 200, r.text
    after = posteriors(cluster.a.url, ns)  # A held the old state; it sees the new generation
    assert after["seq"] == 0 and all(r["observations"] == 0 for r in after["rms"])
    assert feedback(cluster.a.url, [(x["route_id"], -0.5) for x in res[3:]])["unknown"] == 3
    fresh = route(cluster.a.url, pairs(2, offset=650), ns=ns)["results"]
    assert feedback(cluster.b.url, [(x["route_id"], -0.5) for x in fresh])["applied"] == 2
    assert_same_posterior(posteriors(cluster.a.url, ns), posteriors(cluster.b.url, ns))


def test_a_route_says_how_long_it_waited_for_the_store(cluster: Cluster) -> None:
    """Redis stopped (SIGSTOP) for 0.5 s under a route in flight: the gateway waits for it, and
    its headers and metrics say that wait was the store's, as part of its overhead."""
    ns = "store-wait"
    create_namespace(cluster.a.url, ns)
    quick = httpx.post(
        f"{cluster.a.url}/v1/route", json={"namespace": ns, "pairs": pairs(2)}, timeout=60
    )
    assert quick.status_code == 200, quick.text
    assert 0 <= float(quick.headers["x-reward-router-store-ms"]) < 400
    stall_s = 0.5
    with ThreadPoolExecutor(1) as pool:
        cluster.redis.popen.send_signal(signal.SIGSTOP)
        try:
            body = {"namespace": ns, "pairs": pairs(2, offset=20)}
            pending = pool.submit(httpx.post, f"{cluster.a.url}/v1/route", json=body, timeout=60)
            time.sleep(stall_s)
        finally:
            cluster.redis.popen.send_signal(signal.SIGCONT)
        r = pending.result()
    assert r.status_code == 200, r.text
    store_ms = float(r.headers["x-reward-router-store-ms"])
    assert store_ms >= 0.6 * stall_s * 1000  # the request reached the gateway within 0.2 s
    assert float(r.headers["x-reward-router-overhead-ms"]) >= store_ms
    metrics = httpx.get(f"{cluster.a.url}/metrics").text
    slow = re.search(r'route_store_wait_seconds_bucket\{le="0\.1"\} (\S+)', metrics)
    total = re.search(r"reward_router_gateway_route_store_wait_seconds_count (\S+)", metrics)
    assert slow and total and float(total[1]) - float(slow[1]) >= 1  # the stalled one


def _wait(pred: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_rm_killed_mid_run_every_pair_still_answered(
    cluster: Cluster, rm_pool: RMPoolProcs
) -> None:
    ns = "rm-kill"
    body = {"policy": "best-single", "best_rm": "len-b"}
    assert httpx.post(f"{cluster.a.url}/v1/namespaces/{ns}", json=body).status_code == 200
    before = route(cluster.a.url, pairs(4, offset=400), ns=ns)["results"]
    assert {x["rm"] for x in before} == {"len-b"}
    rm_pool.procs["len-b"].kill(signal.SIGKILL)
    answered = []
    for k, url in enumerate([cluster.a.url, cluster.b.url] * 3):
        res = route(url, pairs(5, offset=500 + 5 * k), ns=ns)["results"]
        assert len(res) == 5
        for x in res:
            assert x["rm"] in ("len-a", "tiny-bert") and x["fallback"] is True
        answered += res
    # Feedback lands on the RM that answered, never on the failed one.
    assert feedback(cluster.b.url, [(x["route_id"], -0.4) for x in answered])["applied"] == 30
    post = {r["name"]: r for r in posteriors(cluster.a.url, ns, full=False)["rms"]}
    assert post["len-b"]["observations"] == 0
    assert post["len-b"]["healthy"] is False or post["len-b"]["in_cooldown"] is True
    metrics = httpx.get(f"{cluster.a.url}/metrics").text
    assert 'reward_router_gateway_fallbacks_total{reason="error",rm="len-b"}' in metrics or (
        'reward_router_gateway_fallbacks_total{reason="cooldown",rm="len-b"}' in metrics
    )
    # An ensemble that asks every RM leaves the dead one out and still labels each pair.
    ens = "rm-kill-majority"
    created = httpx.post(f"{cluster.b.url}/v1/namespaces/{ens}", json={"policy": "majority"})
    assert created.status_code == 200, created.text
    for x in route(cluster.b.url, pairs(4, offset=800), ns=ens)["results"]:
        assert sorted(x["rms"]) == ["len-a", "tiny-bert"] and x["rm"] != "len-b"
    # The way back in: the RM restarts, a health check sees it, it is asked again.
    rm_pool.restart("len-b")
    _wait(
        lambda: all(
            r["name"] != "len-b" or (r["healthy"] and not r["in_cooldown"])
            for url in (cluster.a.url, cluster.b.url)
            for r in posteriors(url, ns, full=False)["rms"]
        )
    )
    again = route(cluster.a.url, pairs(3, offset=700), ns=ns)["results"]
    assert {x["rm"] for x in again} == {"len-b"} and not any(x["fallback"] for x in again)
