"""The Redis store writes the route records of concurrent ``put_routes`` calls (concurrent
``/v1/route`` requests) in one pipeline per event-loop turn, on a real redis-server.

What is counted: the server's own ``INFO commandstats`` (one HINCRBY per RM per batch, where
each call used to send its own) and its ``total_connections_received`` (one pipeline needs one
connection; 200 separate ones opened up to the pool's size).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from gateway.store import Outcome, StoreUnavailable
from gateway.store_redis import RedisStore
from tests.gateway.conftest import RMPoolProcs
from tests.gateway.helpers import create_namespace, feedback, gateway_config, pairs, start_gateway


def _h(i: int) -> np.ndarray:
    return np.arange(3, dtype=np.float64) + i


@pytest.fixture
def server(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.config_resetstat()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    st = RedisStore.from_url(redis_url, prefix="t")
    try:
        yield st
    finally:
        await st.aclose()


def _calls(server: redis.Redis, command: str, field: str = "calls") -> int:
    """How often the server ran ``command`` (``field="rejected_calls"``: refused it)."""
    stats = server.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get(field, 0))


async def _check_applied(st: RedisStore, ns: str, gen: str, ids: list[str], arms: list[int]):
    """Every id names its own record: applied once, under its RM, with its own context."""
    res = await st.apply_feedback([(rid, float(i)) for i, rid in enumerate(ids)])
    assert [r.outcome for r in res] == [Outcome.APPLIED] * len(ids)
    assert [r.arm for r in res] == arms
    _, log, _ = await st.read_tail(ns, gen, 0)
    by_id = {o.route_id: o for o in log}
    for i, rid in enumerate(ids):
        assert by_id[rid].reward == float(i)
        np.testing.assert_array_equal(by_id[rid].h, _h(i))


async def test_concurrent_route_writes_share_one_pipeline(
    store: RedisStore, server: redis.Redis
) -> None:
    meta, _ = await store.create_namespace("ns", {})
    connections = int(server.info("stats")["total_connections_received"])
    arms = [i % 2 for i in range(200)]
    got = await asyncio.gather(
        *(store.put_routes("ns", meta.gen, [(a, _h(i))], ttl_s=60) for i, a in enumerate(arms))
    )
    ids = [one for (one,) in got]
    assert len(set(ids)) == 200 and all(rid.startswith(f"ns:{meta.gen}:") for rid in ids)
    assert _calls(server, "set") == 200
    # One batch: one counter increment per RM, and one connection (200 own pipelines opened
    # as many connections as the pool allowed).
    assert _calls(server, "hincrby") == 2
    assert int(server.info("stats")["total_connections_received"]) - connections <= 1
    assert await store.route_counts("ns", meta.gen) == {0: 100, 1: 100}
    assert 0 < server.pttl(store.keys.route("ns", meta.gen, ids[0].split(":")[2])) <= 60_000
    await _check_applied(store, "ns", meta.gen, ids, arms)


async def test_a_batch_holds_at_most_route_batch_records(
    redis_url: str, server: redis.Redis
) -> None:
    st = RedisStore(aioredis.Redis.from_url(redis_url), prefix="t", route_batch=64)
    try:
        meta, _ = await st.create_namespace("ns", {})
        # 150 one-record calls and one of 100 (a batch of its own): 64 + 64 + 22, then 100.
        calls = [st.put_routes("ns", meta.gen, [(0, _h(i))], ttl_s=60) for i in range(150)]
        calls.append(st.put_routes("ns", meta.gen, [(1, _h(i)) for i in range(100)], ttl_s=60))
        await asyncio.gather(*calls)
        assert _calls(server, "hincrby") == 4
        assert await st.route_counts("ns", meta.gen) == {0: 150, 1: 100}
        # Calls awaited one after the other are not held back for company: one batch each.
        for i in range(3):
            await st.put_routes("ns", meta.gen, [(0, _h(i))], ttl_s=60)
        assert _calls(server, "hincrby") == 7
    finally:
        await st.aclose()


async def test_coalesced_rewrites_keep_their_ids_and_move_the_counts(
    store: RedisStore, server: redis.Redis
) -> None:
    meta, _ = await store.create_namespace("ns", {})
    ids = await store.put_routes("ns", meta.gen, [(0, _h(i)) for i in range(20)], ttl_s=60)
    uids = [rid.split(":")[2] for rid in ids]
    server.config_resetstat()
    # Ten routes answered by a fallback RM, rewritten concurrently (as service.route does).
    again = await asyncio.gather(
        *(
            store.put_routes("ns", meta.gen, [(1, _h(i))], 60, uids=[uids[i]], uncount=[0])
            for i in range(10)
        )
    )
    assert [one for (one,) in again] == ids[:10]
    assert _calls(server, "hincrby") == 2  # -10 for RM 0, +10 for RM 1, in one batch
    assert await store.route_counts("ns", meta.gen) == {0: 10, 1: 10}
    await _check_applied(store, "ns", meta.gen, ids, [1] * 10 + [0] * 10)


async def test_a_failed_batch_fails_every_waiting_route_and_stores_nothing(
    store: RedisStore, server: redis.Redis
) -> None:
    meta, _ = await store.create_namespace("ns", {})
    policy = str(server.config_get("maxmemory-policy")["maxmemory-policy"])
    # Redis out of memory ("used memory > maxmemory"): every write of the batch is refused,
    # reads still answer.
    server.config_set("maxmemory-policy", "noeviction")
    server.config_set("maxmemory", 1)
    try:
        got = await asyncio.gather(
            *(store.put_routes("ns", meta.gen, [(0, _h(i))], ttl_s=60) for i in range(50)),
            return_exceptions=True,
        )
    finally:
        server.config_set("maxmemory", 0)
        server.config_set("maxmemory-policy", policy)
    assert all(isinstance(e, StoreUnavailable) and "maxmemory" in str(e) for e in got), got
    assert len({id(e) for e in got}) == 50  # an error of its own for each waiting route
    # One batch, every command of it refused.
    assert _calls(server, "set", "rejected_calls") == 50 and _calls(server, "set") == 0
    assert _calls(server, "hincrby", "rejected_calls") == 1
    assert await store.route_counts("ns", meta.gen) == {}
    assert server.keys(store.keys.route("ns", meta.gen, "*")) == []
    # The store works again once Redis does.
    ids = await store.put_routes("ns", meta.gen, [(0, _h(0))], ttl_s=60)
    await _check_applied(store, "ns", meta.gen, ids, [0])


async def test_one_bad_command_fails_its_whole_batch(
    store: RedisStore, server: redis.Redis
) -> None:
    """The pipeline is one write: a route that failed is never reported stored, and neither is
    any other route of its batch (some of their records may be on the server, unnamed by any
    answer, until their TTL)."""
    a, _ = await store.create_namespace("a", {})
    b, _ = await store.create_namespace("b", {})
    server.set(store.keys.routes("b", b.gen), "not a hash")  # b's HINCRBY fails: WRONGTYPE
    got = await asyncio.gather(
        *(store.put_routes("a", a.gen, [(0, _h(i))], ttl_s=60) for i in range(20)),
        store.put_routes("b", b.gen, [(0, _h(0))], ttl_s=60),
        return_exceptions=True,
    )
    assert all(isinstance(e, StoreUnavailable) and "WRONGTYPE" in str(e) for e in got), got
    # Each in its own batch (awaited one by one), a's routes are stored and b's is refused.
    ids = await store.put_routes("a", a.gen, [(0, _h(0))], ttl_s=60)
    await _check_applied(store, "a", a.gen, ids, [0])
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        await store.put_routes("b", b.gen, [(0, _h(0))], ttl_s=60)


async def test_a_cancelled_route_is_left_out_of_its_batch(
    store: RedisStore, server: redis.Redis
) -> None:
    meta, _ = await store.create_namespace("ns", {})
    tasks = [
        asyncio.ensure_future(store.put_routes("ns", meta.gen, [(0, _h(i))], ttl_s=60))
        for i in range(10)
    ]
    await asyncio.sleep(0)  # every call has joined the batch
    tasks[3].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    assert _calls(server, "set") == 9
    assert await store.route_counts("ns", meta.gen) == {0: 9}


async def test_coalesced_writes_over_cluster_slots(redis_cluster_url: str) -> None:
    st = RedisStore.from_cluster(redis_cluster_url, prefix="t")
    try:
        metas = [(await st.create_namespace(f"run-{k}", {}))[0] for k in range(4)]
        got = await asyncio.gather(
            *(
                st.put_routes(m.name, m.gen, [(k, _h(i))], ttl_s=60)
                for i in range(10)
                for k, m in enumerate(metas)
            )
        )
        for k, m in enumerate(metas):
            ids = [got[i * 4 + k][0] for i in range(10)]
            assert await st.route_counts(m.name, m.gen) == {k: 10}
            await _check_applied(st, m.name, m.gen, ids, [k] * 10)
    finally:
        await st.aclose()


def test_concurrent_routes_through_a_gateway_share_record_writes(
    tmp_path: Path, rm_pool: RMPoolProcs, redis_url: str, server: redis.Redis
) -> None:
    cfg = gateway_config(
        tmp_path,
        {"len-a": rm_pool.urls["len-a"]},
        redis_url=redis_url,
        policy={"name": "bayesian-no-offline"},
    )
    gw = start_gateway(cfg)
    try:
        create_namespace(gw.url, "run")
        server.config_resetstat()

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
                return await asyncio.gather(
                    *(
                        client.post("/v1/route", json={"namespace": "run", "pairs": pairs(1, i)})
                        for i in range(100)
                    )
                )

        answers = asyncio.run(burst())
        assert [r.status_code for r in answers] == [200] * 100
        ids = [r.json()["results"][0]["route_id"] for r in answers]
        assert len(set(ids)) == 100 and _calls(server, "set") == 100
        # Routes that reached the store in the same loop turn shared one write.
        merged = _calls(server, "hincrby")
        assert merged < 100, merged
        assert feedback(gw.url, [(rid, -0.5) for rid in ids])["applied"] == 100
    finally:
        gw.kill()
        gw.log.unlink(missing_ok=True)
