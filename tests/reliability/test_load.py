"""Smoke run of the load driver (benchmarks/bench_load.py) against the real setup it measures:
a private Redis, a ``length`` and a ``verifier`` RM service, two gateway replicas on that Redis.

A few seconds at a low rate: nothing fails, every route and every feedback is answered, each
route id's feedback is applied exactly once (half of it sent to the other replica), and with a
short ``route_ttl_s`` the route records leave Redis while the log keeps every observation.
Figures are not asserted (the machine is shared); the benchmark prints them.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
import redis

from benchmarks.bench_load import KEY_PREFIX, LoadConfig, cluster, drive
from tests.gateway.helpers import posteriors

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

TTL_S = 2.0


def route_keys(client: redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter(match=f"{KEY_PREFIX}:ns:*:g:*:r:*", count=1000))


def log_entries(client: redis.Redis) -> int:
    return sum(int(client.llen(k)) for k in client.scan_iter(match=f"{KEY_PREFIX}:ns:*:g:*:log"))


def test_open_loop_load_on_two_replicas_loses_nothing_and_route_records_expire(
    tmp_path: Path,
) -> None:
    cfg = LoadConfig(rate=6.0, duration_s=5.0, pairs_per_request=2, drain_s=30.0)
    with cluster(tmp_path, route_ttl_s=TTL_S, router=False) as c:
        res = asyncio.run(drive(c.urls, cfg))
        client = redis.Redis.from_url(c.redis_url)
        try:
            keys_after_run = route_keys(client)
            pairs = cfg.requests * cfg.pairs_per_request

            assert dict(res.errors) == {}, res.first_error
            assert res.sent == cfg.requests == 30
            assert res.answered == res.feedback_answered == res.sent
            assert res.routes == pairs
            assert (res.applied, res.duplicate, res.unknown) == (pairs, 0, 0)
            assert len(res.route_ms) == len(res.feedback_ms) == res.sent
            # Every observation is in the shared log, and both replicas fold all of it,
            # whichever replica the feedback went to.
            assert log_entries(client) == pairs
            for url in c.urls:
                post = posteriors(url, "load", full=False)
                assert post["seq"] == pairs, post
                assert sum(rm["observations"] for rm in post["rms"]) == pairs, post
                assert sum(rm["routes"] for rm in post["rms"]) == pairs, post

            # The last second's records are still there right after the run ...
            assert keys_after_run > 0
            # ... and every record (applied ones included) is gone once the TTL has passed,
            # while the log keeps every observation.
            deadline = time.monotonic() + TTL_S + 30.0
            while route_keys(client) and time.monotonic() < deadline:
                time.sleep(0.25)
            assert route_keys(client) == 0
            assert log_entries(client) == pairs
        finally:
            client.close()
