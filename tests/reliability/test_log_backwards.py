"""Redis restored from an older RDB file under a running gateway (its own default persistence,
or a failover to a lagging replica): the namespace's meta and generation survive, the log is
shorter, the route records of the lost feedback are gone or unapplied again.

Before: the replica kept folding from its own newer seq, skipped what was appended at the
positions it had already folded (0.0145 apart in posterior means from a rebuild), and wrote its
stale state as the namespace's snapshot, which every fresh replica then loaded; nothing logged.
Now: the replica notices on its next read (the entry at its seq is not the one it folded),
logs an error, rebuilds from the log, and never writes a snapshot ahead of the log; it agrees
with a fresh replica that reads the restored log from the start.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import httpx
import redis

from tests.gateway.helpers import (
    feedback,
    gateway_config,
    pairs,
    posteriors,
    route,
    start_gateway,
    start_rm,
)
from tests.procs import Proc, free_port, redis_server_binary, start_process


def _rdb_redis(port: int, data: Path) -> Proc:
    """redis-server with RDB persistence only (its default kind), saved by hand below."""
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
    args += ["--dir", str(data), "--appendonly", "no", "--save", ""]
    return start_process(args, port)


def _step(gw: Proc, offset: int, n: int) -> list[str]:
    ids = [r["route_id"] for r in route(gw.url, pairs(n, offset=offset), ns="rdb")["results"]]
    assert feedback(gw.url, [(rid, -0.1 * (i % 7)) for i, rid in enumerate(ids)])["applied"] == n
    return ids


def test_restore_from_an_older_rdb_is_detected_and_rebuilt(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    data.mkdir()
    port = free_port()
    rdb = _rdb_redis(port, data)
    url = f"redis://127.0.0.1:{port}/0"
    rm = start_rm(tmp_path, "len", backend="length")
    cfg = gateway_config(
        tmp_path, {"len": rm.url}, redis_url=url, snapshot_every=5, store_retries=20,
        policy={"name": "bayesian-no-offline"},
    )  # fmt: skip
    gw = start_gateway(cfg)
    fresh: Proc | None = None
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        ready = httpx.get(f"{gw.url}/readyz").json()
        assert ready["durable"] is False and "without AOF" in ready["warning"]
        httpx.post(f"{gw.url}/v1/namespaces/rdb").raise_for_status()
        _step(gw, 0, 20)
        client.save()  # the "older copy": 20 observations
        shutil.copy(data / "dump.rdb", tmp_path / "old.rdb")
        _step(gw, 100, 15)
        assert posteriors(gw.url, "rdb")["seq"] == 35  # folded, snapshot at 35 written

        rdb.kill(signal.SIGKILL)
        shutil.copy(tmp_path / "old.rdb", data / "dump.rdb")
        rdb = _rdb_redis(port, data)
        client = redis.Redis(host="127.0.0.1", port=port)
        assert client.llen(f"rr:ns:{{rdb}}:g:{_gen(client)}:log") == 20

        _step(gw, 200, 20)  # the log grows back past 35: 40 entries, 21..40 not the old ones
        post = posteriors(gw.url, "rdb")
        assert post["seq"] == 40 == sum(r["observations"] for r in post["rms"])
        assert "the store's log does not hold what this replica folded" in gw.logs()
        assert "folded up to seq 35" in gw.logs()
        text = httpx.get(f"{gw.url}/metrics").text
        assert "reward_router_gateway_rebuilds_total 1.0" in text

        # No snapshot ahead of the log, and the one there is of this log.
        gen = _gen(client)
        snap_seq = int(client.hget(f"rr:ns:{{rdb}}:g:{gen}:snap", "seq") or 0)
        assert snap_seq <= 40

        # A fresh replica reading the restored log agrees (its snapshot + tail, or the log).
        fresh = start_gateway(gateway_config(
            tmp_path, {"len": rm.url}, redis_url=url, snapshot_every=5,
            policy={"name": "bayesian-no-offline"},
        ))  # fmt: skip
        other = posteriors(fresh.url, "rdb")
        assert other["seq"] == 40
        for a, b in zip(post["params"]["means"], other["params"]["means"], strict=True):
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-9
    finally:
        for p in (gw, fresh, rm, rdb):
            if p is not None:
                p.kill()


def _gen(client: redis.Redis) -> str:
    gen = client.hget("rr:ns:{rdb}:meta", "gen")
    assert gen is not None
    return gen.decode() if isinstance(gen, bytes) else str(gen)
