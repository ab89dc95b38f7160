"""One contract, three backends: the in-memory store, the SQLite file and Redis pass the same
tests; the SQLite file also keeps everything across a close and reopen."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.store import AUDIT_SUFFIX, Outcome, RouteId, Store, audit_uid
from gateway.store_memory import EmbeddedStore
from gateway.store_redis import RedisStore
from gateway.store_sqlite import SqliteStore
from tests.procs import SentinelSetup


@pytest.fixture(params=["embedded", "sqlite", "redis", "sentinel", "cluster"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "embedded":
        st: Store = EmbeddedStore()
    elif request.param == "sqlite":
        st = SqliteStore(tmp_path / "state.db")
    elif request.param == "sentinel":
        setup: SentinelSetup = request.getfixturevalue("redis_sentinel")
        st = RedisStore.from_sentinel([("127.0.0.1", setup.sentinel.port)], setup.name, prefix="t")
    elif request.param == "cluster":
        st = RedisStore.from_cluster(request.getfixturevalue("redis_cluster_url"), prefix="t")
    else:
        url = request.getfixturevalue("redis_url")
        st = RedisStore.from_url(url, prefix="t")
    try:
        yield st
    finally:
        await st.aclose()


def _h(i: int, d: int = 3) -> np.ndarray:
    return np.arange(d, dtype=np.float64) * 0.1 + i


async def test_namespace_create_is_idempotent(store: Store) -> None:
    meta, created = await store.create_namespace("run-1", {"policy": "bayesian", "x": 1})
    again, created2 = await store.create_namespace("run-1", {"policy": "random"})
    assert created and not created2
    assert again.gen == meta.gen and again.config == {"policy": "bayesian", "x": 1}
    assert await store.list_namespaces() == ["run-1"]
    assert (await store.get_namespace("run-1")) == again
    assert await store.get_namespace("other") is None


async def test_applied_feedback_names_a_two_byte_rm_index(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    ids = await store.put_routes("ns", meta.gen, [(258, _h(0))], ttl_s=60)
    (res,) = await store.apply_feedback([(ids[0], 1.0)])
    assert (res.outcome, res.arm) == (Outcome.APPLIED, 258)


async def test_feedback_applied_once_then_duplicate_and_unknown(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    ids = await store.put_routes("ns", meta.gen, [(1, _h(0)), (0, _h(1))], ttl_s=60)
    assert len(set(ids)) == 2 and all(RouteId.parse(i) for i in ids)
    res = await store.apply_feedback(
        [(ids[0], -0.25), (ids[0], 9.0), ("ns:zz:nothere", 1.0), ("garbage", 1.0), (ids[1], 2.5)]
    )
    assert [r.outcome for r in res] == [
        Outcome.APPLIED,
        Outcome.DUPLICATE,
        Outcome.UNKNOWN,
        Outcome.UNKNOWN,
        Outcome.APPLIED,
    ]
    assert [r.seq for r in res] == [1, None, None, None, 2]
    assert [r.arm for r in res] == [1, None, None, None, 0]
    again = await store.apply_feedback([(ids[1], 3.0)])
    assert again[0].outcome is Outcome.DUPLICATE
    meta2, log, length = await store.read_tail("ns", meta.gen, 0)
    assert meta2 == meta and length == 2
    assert [(o.seq, o.arm, o.reward, o.route_id) for o in log] == [
        (1, 1, -0.25, ids[0]),
        (2, 0, 2.5, ids[1]),
    ]
    np.testing.assert_array_equal(log[0].h, _h(0))
    np.testing.assert_array_equal(log[1].h, _h(1))
    _, tail, _ = await store.read_tail("ns", meta.gen, 1)
    assert [o.seq for o in tail] == [2]
    assert await store.route_counts("ns", meta.gen) == {1: 1, 0: 1}


async def test_chunked_reads_and_the_log_length(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    ids = await store.put_routes("ns", meta.gen, [(i % 2, _h(i)) for i in range(5)], ttl_s=60)
    await store.apply_feedback([(rid, float(i)) for i, rid in enumerate(ids)])
    chunks = []
    seq = 0
    while True:
        _, part, length = await store.read_tail("ns", meta.gen, seq, limit=2)
        assert length == 5
        if not part:
            break
        chunks.append([o.seq for o in part])
        seq = part[-1].seq
    assert chunks == [[1, 2], [3, 4], [5]]
    # A reader ahead of the log (it folded more than the store holds now) sees the length.
    assert (await store.read_tail("ns", meta.gen, 9))[1:] == ([], 5)
    assert (await store.read_tail("absent", meta.gen, 0)) == (None, [], 0)


async def test_trimmed_log_keeps_its_sequence_numbers(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    ids = await store.put_routes("ns", meta.gen, [(0, _h(i)) for i in range(6)], ttl_s=60)
    await store.apply_feedback([(rid, float(i)) for i, rid in enumerate(ids[:4])])
    assert await store.trim_log("ns", meta.gen, 3) == 3
    assert await store.trim_log("ns", meta.gen, 2) == 3  # never backwards
    _, log, length = await store.read_tail("ns", meta.gen, 0)
    assert [o.seq for o in log] == [4] and log[0].reward == 3.0 and length == 4
    res = await store.apply_feedback([(ids[4], 4.0), (ids[0], 9.0)])
    assert [(r.outcome, r.seq) for r in res] == [(Outcome.APPLIED, 5), (Outcome.DUPLICATE, None)]
    _, log, length = await store.read_tail("ns", meta.gen, 4, limit=5)
    assert [o.seq for o in log] == [5] and length == 5
    uid3 = ids[3].split(":")[2]
    assert not await store.put_snapshot("ns", meta.gen, 2, b"gone", last_uid=ids[1].split(":")[2])
    assert await store.put_snapshot("ns", meta.gen, 4, b"s4", last_uid=uid3)
    assert await store.trim_log("ns", meta.gen, 99) == 5  # at most to the end
    assert (await store.read_tail("ns", meta.gen, 0))[1:] == ([], 5)


async def test_namespace_limit_is_checked_with_the_creation(store: Store) -> None:
    from gateway.store import NamespaceLimit

    await store.create_namespace("a", {}, limit=2)
    await store.create_namespace("b", {}, limit=2)
    _, created = await store.create_namespace("a", {}, limit=2)  # existing: no new one
    assert not created
    with pytest.raises(NamespaceLimit, match="2 namespaces"):
        await store.create_namespace("c", {}, limit=2)
    assert await store.list_namespaces() == ["a", "b"]
    await store.delete_namespace("b")
    assert (await store.create_namespace("c", {}, limit=2))[1]


async def test_expired_route_is_unknown(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    (rid,) = await store.put_routes("ns", meta.gen, [(0, _h(0))], ttl_s=0.05)
    await asyncio.sleep(0.2)
    assert (await store.apply_feedback([(rid, 1.0)]))[0].outcome is Outcome.UNKNOWN
    assert (await store.read_tail("ns", meta.gen, 0))[1] == []


async def test_reset_orphans_old_routes_and_log(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {"p": 1})
    old = await store.put_routes("ns", meta.gen, [(0, _h(0)), (0, _h(1))], ttl_s=60)
    await store.apply_feedback([(old[0], 1.0)])
    new = await store.reset_namespace("ns")
    assert new is not None and new.gen != meta.gen and new.config == {"p": 1}
    assert (await store.apply_feedback([(old[1], 1.0)]))[0].outcome is Outcome.UNKNOWN
    got, log, _ = await store.read_tail("ns", meta.gen, 0)
    assert got == new and log == []  # the caller sees the new gen and rebuilds
    assert (await store.read_tail("ns", new.gen, 0))[1] == []
    assert await store.reset_namespace("absent") is None


async def test_delete_namespace(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    (rid,) = await store.put_routes("ns", meta.gen, [(0, _h(0))], ttl_s=60)
    assert await store.delete_namespace("ns")
    assert not await store.delete_namespace("ns")
    assert await store.get_namespace("ns") is None
    assert await store.list_namespaces() == []
    assert (await store.apply_feedback([(rid, 1.0)]))[0].outcome is Outcome.UNKNOWN
    recreated, created = await store.create_namespace("ns", {})
    assert created and recreated.gen != meta.gen


async def test_concurrent_feedback_for_one_route_applies_once(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    ids = await store.put_routes("ns", meta.gen, [(i % 2, _h(i)) for i in range(20)], ttl_s=60)
    batches = [[(rid, float(k)) for rid in ids] for k in range(5)]
    results = await asyncio.gather(*(store.apply_feedback(b) for b in batches))
    applied = [r for res in results for r in res if r.outcome is Outcome.APPLIED]
    dups = [r for res in results for r in res if r.outcome is Outcome.DUPLICATE]
    assert len(applied) == 20 and len(dups) == 80
    _, log, _ = await store.read_tail("ns", meta.gen, 0)
    assert sorted(o.route_id for o in log) == sorted(ids)
    assert [o.seq for o in log] == list(range(1, 21))


async def test_sticky_claims_the_first_wins_and_every_caller_reads_it(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    assert await store.get_sticky("ns", meta.gen, ["p"]) == {}
    claims = await asyncio.gather(
        *(store.claim_sticky("ns", meta.gen, "p", f"v{i}".encode(), 60) for i in range(8))
    )
    assert len(set(claims)) == 1 and claims[0] in {f"v{i}".encode() for i in range(8)}
    assert await store.claim_sticky("ns", meta.gen, "p", b"late", 60) == claims[0]
    got = await store.get_sticky("ns", meta.gen, ["p", "other", "x" * 5000])
    assert got == {"p": claims[0]}
    # per generation: a reset starts with no sticky routes
    new = await store.reset_namespace("ns")
    assert new is not None and await store.get_sticky("ns", new.gen, ["p"]) == {}


async def test_an_expired_sticky_claim_can_be_claimed_again(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    assert await store.claim_sticky("ns", meta.gen, "p", b"old", 0.05) == b"old"
    await asyncio.sleep(0.2)
    assert await store.get_sticky("ns", meta.gen, ["p"]) == {}
    assert await store.claim_sticky("ns", meta.gen, "p", b"new", 60) == b"new"


async def test_rewrite_keeps_the_id_and_moves_the_count(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    ids = await store.put_routes("ns", meta.gen, [(0, _h(0)), (0, _h(1))], ttl_s=60)
    uid = ids[1].split(":")[2]
    again = await store.put_routes("ns", meta.gen, [(2, _h(1))], ttl_s=60, uids=[uid], uncount=[0])
    assert again == [ids[1]]
    assert await store.route_counts("ns", meta.gen) == {0: 1, 2: 1}
    await store.apply_feedback([(ids[1], 1.0)])
    _, log, _ = await store.read_tail("ns", meta.gen, 0)
    assert [o.arm for o in log] == [2]  # the rewritten record is the one applied


async def test_a_snapshot_is_never_written_ahead_of_the_log(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    ids = await store.put_routes("ns", meta.gen, [(0, _h(0)), (0, _h(1))], ttl_s=60)
    await store.apply_feedback([(ids[0], 1.0)])
    uid0, uid1 = (i.split(":")[2] for i in ids)
    assert not await store.put_snapshot("ns", meta.gen, 2, b"ahead", last_uid=uid1)  # no seq 2
    assert not await store.put_snapshot("ns", meta.gen, 1, b"other", last_uid=uid1)  # not seq 1's
    assert await store.get_snapshot("ns", meta.gen) is None
    assert await store.put_snapshot("ns", meta.gen, 1, b"ok", last_uid=uid0)
    assert await store.get_snapshot("ns", meta.gen) == (1, b"ok")


async def test_snapshots_only_move_forward(store: Store) -> None:
    meta, _ = await store.create_namespace("ns", {})
    assert await store.get_snapshot("ns", meta.gen) is None
    assert await store.put_snapshot("ns", meta.gen, 10, b"\x00ten")
    assert not await store.put_snapshot("ns", meta.gen, 7, b"seven")  # an older state: kept out
    assert await store.get_snapshot("ns", meta.gen) == (10, b"\x00ten")
    new = await store.reset_namespace("ns")
    assert new is not None and await store.get_snapshot("ns", new.gen) is None


async def test_sqlite_keeps_everything_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    st = SqliteStore(path)
    meta, _ = await st.create_namespace("ns", {"policy": "random"})
    ids = await st.put_routes("ns", meta.gen, [(1, _h(0)), (0, _h(1)), (0, _h(2))], ttl_s=60)
    await st.apply_feedback([(ids[0], 0.5), (ids[1], -1.0)])
    await st.put_snapshot("ns", meta.gen, 2, b"snap")
    await st.aclose()

    again = SqliteStore(path)
    try:
        assert await again.get_namespace("ns") == meta
        res = await again.apply_feedback([(ids[0], 9.0), (ids[2], 2.0)])
        assert [(r.outcome, r.seq) for r in res] == [
            (Outcome.DUPLICATE, None),
            (Outcome.APPLIED, 3),
        ]
        _, log, _ = await again.read_tail("ns", meta.gen, 0)
        assert [(o.seq, o.arm, o.reward) for o in log] == [(1, 1, 0.5), (2, 0, -1.0), (3, 0, 2.0)]
        assert await again.route_counts("ns", meta.gen) == {1: 1, 0: 2}
        assert await again.get_snapshot("ns", meta.gen) == (2, b"snap")
        assert await again.durability_warning() is None
    finally:
        await again.aclose()


async def test_memory_only_stores_say_so(redis_url: str) -> None:
    assert "memory-only" in (await EmbeddedStore().durability_warning() or "")
    st = RedisStore.from_url(redis_url, prefix="t")  # the tests' redis runs with AOF on
    try:
        assert await st.durability_warning() is None
    finally:
        await st.aclose()


async def test_an_audit_is_an_entry_of_its_own_kind_applied_once(store: Store) -> None:
    """A gold audit's record (route uid + AUDIT_SUFFIX) goes through the same exactly-once
    step; its log entry reads as an audit, the route's own feedback still applies, and the
    audit's record is no route (the counts are taken back)."""
    meta, _ = await store.create_namespace("ns", {})
    (rid,) = await store.put_routes("ns", meta.gen, [(1, _h(0))], ttl_s=60)
    uid = audit_uid(RouteId.parse(rid).uid)  # type: ignore[union-attr]
    (aid,) = await store.put_routes("ns", meta.gen, [(1, _h(0))], 60, uids=[uid], uncount=[1])
    assert aid == rid + AUDIT_SUFFIX and RouteId.parse(aid) is not None
    res = await store.apply_feedback([(aid, 1.0), (aid, 0.0), (rid, -0.3), (rid, -0.3)])
    assert [r.outcome for r in res] == [
        Outcome.APPLIED,
        Outcome.DUPLICATE,
        Outcome.APPLIED,
        Outcome.DUPLICATE,
    ]
    _, log, length = await store.read_tail("ns", meta.gen, 0)
    assert length == 2
    assert [(o.audit, o.reward, o.arm, o.route_id) for o in log] == [
        (True, 1.0, 1, aid),
        (False, -0.3, 1, rid),
    ]
    np.testing.assert_array_equal(log[0].h, _h(0))
    assert await store.route_counts("ns", meta.gen) in ({1: 1}, {1: 1, 0: 0})
