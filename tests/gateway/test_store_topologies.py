"""The Redis store on real Sentinel and Cluster servers, and its connection pool under bursts.

The store contract itself runs against every topology in test_store.py; here: what only a
topology has (slots, a failover, a half-done creation) and the pool's queueing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from gateway.settings import load_settings
from gateway.store import Outcome, StoreUnavailable
from gateway.store_redis import RedisStore
from reward_router.errors import ConfigError
from tests.gateway.helpers import (
    feedback,
    gateway_config,
    pairs,
    posteriors,
    route,
    start_gateway,
    start_rm,
)
from tests.procs import Proc, SentinelSetup, _wait_until, start_sentinel

BASE: dict[str, object] = {
    "rms": [{"name": "a", "url": "http://127.0.0.1:1"}],
    "policy": {"name": "random"},
}


def _h(i: int) -> np.ndarray:
    return np.arange(3, dtype=np.float64) + i


async def test_cluster_namespaces_spread_over_nodes_and_feedback_spans_them(
    redis_cluster_url: str,
) -> None:
    st = RedisStore.from_cluster(redis_cluster_url, prefix="t")
    try:
        names = [f"run-{i}" for i in range(12)]
        ids: list[str] = []
        for ns in names:
            meta, created = await st.create_namespace(ns, {}, limit=20)
            assert created
            ids += await st.put_routes(ns, meta.gen, [(1, _h(0))], ttl_s=60)
        # The namespaces live on more than one node (so one script over two of them would be
        # CROSSSLOT), each namespace's keys in one slot.
        client = st._r
        slots = {ns: await client.cluster_keyslot(st.keys.meta(ns)) for ns in names}
        for ns in names:
            gen = (await st.get_namespace(ns)).gen  # type: ignore[union-attr]
            for key in (
                st.keys.log(ns, gen),
                st.keys.route(ns, gen, "x"),
                st.keys.snapshot(ns, gen),
            ):
                assert await client.cluster_keyslot(key) == slots[ns]
        nodes = {client.get_node_from_key(st.keys.meta(ns)).name for ns in names}
        assert len(nodes) > 1
        # One feedback batch naming all of them: one script per namespace, all applied once.
        res = await st.apply_feedback([(rid, 0.5) for rid in ids] + [(ids[0], 1.0)])
        assert [r.outcome for r in res] == [Outcome.APPLIED] * len(ids) + [Outcome.DUPLICATE]
        assert [r.namespace for r in res[:-1]] == names
        assert await st.list_namespaces() == sorted(names)
        assert await st.durability_warning() is None  # every primary runs with AOF
        assert await st.delete_namespace("run-3")
        assert "run-3" not in await st.list_namespaces()
    finally:
        await st.aclose()


async def test_a_creation_cut_in_half_is_not_listed_and_is_healed(redis_url: str) -> None:
    st = RedisStore.from_url(redis_url, prefix="t")
    try:
        # What a crash between the two steps of create_namespace leaves: a name, no meta.
        await st._r.sadd(st.keys.namespaces(), "half")
        assert await st.list_namespaces() == []
        assert await st.get_namespace("half") is None
        meta, created = await st.create_namespace("half", {"p": 1}, limit=1)
        assert created and await st.list_namespaces() == ["half"]
        assert meta == await st.get_namespace("half")
        await st._r.sadd(st.keys.namespaces(), "other")
        assert not await st.delete_namespace("other")  # nothing to delete, the name removed
        assert await st._r.smembers(st.keys.namespaces()) == {b"half"}
    finally:
        await st.aclose()


async def test_sentinel_failover_keeps_every_acknowledged_feedback(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    if not __import__("shutil").which("redis-sentinel"):
        pytest.skip("redis-sentinel is not installed (Debian: apt-get install redis-sentinel)")
    setup: SentinelSetup = start_sentinel(tmp_path_factory.mktemp("failover"))
    st = RedisStore.from_sentinel([("127.0.0.1", setup.sentinel.port)], setup.name, prefix="t")
    try:
        meta, _ = await st.create_namespace("run", {})
        ids = await st.put_routes("run", meta.gen, [(i % 2, _h(i)) for i in range(6)], ttl_s=60)
        first = await st.apply_feedback([(rid, float(i)) for i, rid in enumerate(ids[:3])])
        assert [r.outcome for r in first] == [Outcome.APPLIED] * 3
        # Acknowledged writes reach the replica before the switch (Redis replicates
        # asynchronously: what a master acknowledged but had not sent is lost in a failover).
        await st._r.execute_command("WAIT", 1, 5000)
        _wait_until("the Sentinel sees the replica in sync", setup.replica_known)
        sentinel = redis.Redis(host="127.0.0.1", port=setup.sentinel.port)
        try:
            sentinel.execute_command("SENTINEL", "FAILOVER", setup.name)
        finally:
            sentinel.close()
        _wait_until("the replica is the master", lambda: setup.master_port() == setup.replica.port)
        # The same store, its pooled connections to the old master closed by the Sentinel,
        # finds the new master by itself.
        rest = await st.apply_feedback([(rid, float(i + 3)) for i, rid in enumerate(ids[3:])])
        again = await st.apply_feedback([(ids[0], 9.0)])
        assert [r.outcome for r in rest] == [Outcome.APPLIED] * 3
        assert again[0].outcome is Outcome.DUPLICATE
        _, log, length = await st.read_tail("run", meta.gen, 0)
        assert length == 6 and [o.reward for o in log] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        role = await st._r.execute_command("ROLE")
        assert role[0] in (b"master", "master")
    finally:
        await st.aclose()
        setup.kill()


def _sentinel_store(request: pytest.FixtureRequest, **kw: Any) -> tuple[RedisStore, str]:
    setup: SentinelSetup = request.getfixturevalue("redis_sentinel")
    st = RedisStore.from_sentinel([("127.0.0.1", setup.sentinel.port)], setup.name, **kw)
    return st, f"redis://127.0.0.1:{setup.master_port()}/0"


@pytest.mark.parametrize("topology", ["redis", "sentinel", "cluster"])
async def test_a_burst_past_the_pool_queues_instead_of_failing(
    request: pytest.FixtureRequest, topology: str
) -> None:
    if topology == "cluster":
        url = request.getfixturevalue("redis_cluster_url")
        st = RedisStore.from_cluster(url, prefix="t", pool_size=4)
    elif topology == "sentinel":
        st, url = _sentinel_store(request, prefix="t", pool_size=4)
    else:
        url = request.getfixturevalue("redis_url")
        st = RedisStore.from_url(url, prefix="t", pool_size=4)
    try:
        meta, _ = await st.create_namespace("ns", {})
        ids = await st.put_routes("ns", meta.gen, [(0, _h(i)) for i in range(400)], ttl_s=60)
        if topology == "redis":
            # What the store did before: redis-py's default pool, which fails past its size.
            old = RedisStore(aioredis.Redis.from_url(url, max_connections=4), prefix="t")
            try:
                got = await asyncio.gather(
                    *(old.get_namespace("ns") for _ in range(400)), return_exceptions=True
                )
            finally:
                await old.aclose()
            refused = [e for e in got if isinstance(e, StoreUnavailable)]
            assert refused and "Too many connections" in str(refused[0])
        # 400 calls at once on 4 connections: redis-py's default pool raised "Too many
        # connections" for every call past its size; these wait their turn.
        res = await asyncio.gather(*(st.apply_feedback([(rid, 1.0)]) for rid in ids))
        assert all(r[0].outcome is Outcome.APPLIED for r in res)
        _, log, length = await st.read_tail("ns", meta.gen, 0)
        assert length == 400 and sorted(o.seq for o in log) == list(range(1, 401))
        server = redis.Redis.from_url(url)
        try:
            clients = server.client_list()
        finally:
            server.close()
        # Less this one, a replica's link and the Sentinel's own connections.
        mine = [
            c
            for c in clients
            if c.get("cmd") != "client|list"
            and "S" not in c.get("flags", "")
            and not c.get("name", "").startswith("sentinel")
        ]
        # (On the cluster, the node of this URL may hold none of these keys.)
        assert (0 if topology == "cluster" else 1) <= len(mine) <= 4
    finally:
        await st.aclose()


@pytest.mark.parametrize("topology", ["redis", "sentinel", "cluster"])
async def test_a_pool_held_past_its_wait_is_a_clear_store_error(
    request: pytest.FixtureRequest, topology: str
) -> None:
    if topology == "cluster":
        url = request.getfixturevalue("redis_cluster_url")
        st = RedisStore.from_cluster(url, prefix="t", pool_size=1, pool_timeout_s=0.2)
        expect = "redis_pool_size"
    elif topology == "sentinel":
        st, _ = _sentinel_store(request, prefix="t", pool_size=1, pool_timeout_s=0.2)
        expect = "No connection available"
    else:
        url = request.getfixturevalue("redis_url")
        st = RedisStore.from_url(url, prefix="t", pool_size=1, pool_timeout_s=0.2)
        expect = "No connection available"
    try:
        await st.ping()
        hold = asyncio.create_task(st._call(lambda: st._r.blpop(["{ns}:never"], timeout=1)))
        await asyncio.sleep(0.1)
        with pytest.raises(StoreUnavailable, match=expect):
            await st.get_namespace("ns")
        await hold
        assert await st.get_namespace("ns") is None  # free again
    finally:
        await st.aclose()


def test_settings_build_the_topology() -> None:
    s = load_settings(
        None,
        **BASE,
        redis_sentinels="10.0.0.1:26379, 10.0.0.2:26379",
        redis_sentinel_master="mymaster",
        redis_password="a-real-s3cret",
        redis_sentinel_password="another-s3cret",
    )
    assert s.uses_redis and s.redis_url is None
    assert s.sentinel_addresses() == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
    dumped = str(s.safe_dict())
    assert "a-real-s3cret" not in dumped and "another-s3cret" not in dumped
    assert s.safe_dict()["redis_password"] == "configured"
    c = load_settings(None, **BASE, redis_url="redis://h:7000", redis_cluster=True)
    assert c.uses_redis and c.redis_pool_size == 128 and c.redis_pool_timeout_s == 10.0
    assert not load_settings(None, **BASE).uses_redis


def test_sentinels_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARD_ROUTER_GATEWAY_REDIS_SENTINELS", "s1:26379,s2:26380")
    monkeypatch.setenv("REWARD_ROUTER_GATEWAY_REDIS_SENTINEL_MASTER", "rr")
    s = load_settings(None, **BASE)
    assert s.redis_sentinels == ["s1:26379", "s2:26380"] and s.redis_sentinel_master == "rr"


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        ({"redis_url": "redis+sentinel://h:26379/mymaster"}, "redis_url", "redis_sentinels"),
        ({"redis_url": "sentinel://h:26379"}, "redis_url", "redis_sentinel_master"),
        ({"redis_url": "http://h:6379"}, "redis_url", "redis://"),
        ({"redis_sentinels": ["h:26379"]}, "redis_sentinel_master", "sentinel monitor"),
        ({"redis_sentinels": ["h"], "redis_sentinel_master": "m"}, "redis_sentinels", "host:port"),
        ({"redis_sentinels": "h:99999", "redis_sentinel_master": "m"}, "redis_sentinels", "port"),
        (
            {"redis_sentinels": ["h:1"], "redis_sentinel_master": "m", "redis_url": "redis://h"},
            "redis_url",
            "not both",
        ),
        (
            {"redis_sentinels": ["h:1"], "redis_sentinel_master": "m", "redis_cluster": True},
            "redis_cluster",
            "no Sentinels",
        ),
        ({"redis_cluster": True}, "redis_cluster", "one node"),
        ({"redis_cluster": True, "redis_url": "redis://h:7000/3"}, "redis_url", "database 0"),
        ({"redis_password": "x-s3cret", "redis_url": "redis://h"}, "redis_password", "redis_url"),
        ({"redis_sentinel_master": "m"}, "redis_sentinel_master", "redis_sentinels"),
        (
            {
                "redis_sentinels": ["h:1"],
                "redis_sentinel_master": "m",
                "redis_password": "changeme",
            },
            "redis_password",
            "placeholder",
        ),
        ({"redis_pool_size": 0}, "redis_pool_size", "greater than or equal to 1"),
        ({"redis_pool_timeout_s": 0}, "redis_pool_timeout_s", "greater than 0"),
    ],
)
def test_bad_redis_settings_name_the_field(
    overrides: dict[str, object], field: str, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, **BASE, **overrides)
    assert info.value.field.startswith(field) and says in str(info.value), str(info.value)


@pytest.fixture(scope="module")
def length_rm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_rm(tmp_path_factory.mktemp("rm"), "len", backend="length")
    try:
        yield proc
    finally:
        proc.kill()


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_a_gateway_routes_and_learns_on_the_topology(
    request: pytest.FixtureRequest, tmp_path: Path, length_rm: Proc, topology: str
) -> None:
    if topology == "sentinel":
        setup: SentinelSetup = request.getfixturevalue("redis_sentinel")
        store: dict[str, Any] = {
            "redis_sentinels": [f"127.0.0.1:{setup.sentinel.port}"],
            "redis_sentinel_master": setup.name,
        }
    else:
        store = {"redis_url": request.getfixturevalue("redis_cluster_url"), "redis_cluster": True}
    cfg = gateway_config(
        tmp_path, {"len": length_rm.url}, policy={"name": "bayesian-no-offline"}, **store
    )
    gw = start_gateway(cfg)
    try:
        ready = httpx.get(f"{gw.url}/readyz", timeout=10).json()
        assert ready["ready"], ready
        out = route(gw.url, pairs(4), ns="run-a")["results"]
        other = route(gw.url, pairs(2, offset=4), ns="run-b")["results"]
        # One feedback batch over both namespaces (two slots on the cluster).
        items = [(r["route_id"], -0.5) for r in out + other]
        assert feedback(gw.url, items)["applied"] == 6
        assert feedback(gw.url, items[:1])["duplicate"] == 1
        seen = posteriors(gw.url, "run-a", full=False)
        assert sum(rm["observations"] for rm in seen["rms"]) == 4
    finally:
        gw.kill()
        gw.log.unlink(missing_ok=True)
