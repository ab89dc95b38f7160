"""How a replica folds the store's log, in process (the store is the in-memory one; the same
code runs on every store): chunked reads, folding off the event loop, laser independent of
read batching, the namespace cap, the bounded quantile window, and a log that went backwards
(detected, rebuilt from the log, an error logged, no snapshot written from the old state).

The same detection against a real Redis restored from an older RDB file is in
``tests/reliability/test_log_backwards.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from gateway.namespaces import NsState
from gateway.service import GatewayService, InputError
from gateway.settings import GatewaySettings
from gateway.store import NamespaceLimit, audit_uid, new_uid
from gateway.store_memory import EmbeddedStore
from reward_router.errors import ConfigError
from reward_router.protocol import NamespaceConfig

RMS = [{"name": "a", "url": "http://127.0.0.1:9"}, {"name": "b", "url": "http://127.0.0.1:9"}]


def _service(store: EmbeddedStore | None = None, **settings: Any) -> GatewayService:
    svc = GatewayService.build(
        GatewaySettings(rms=RMS, policy={"name": "bayesian-no-offline"}, seed=0, **settings)
    )
    if store is not None:
        svc.store = svc.namespaces.store = store
    return svc


@pytest.fixture
async def svc() -> AsyncIterator[GatewayService]:
    s = _service(log_read_chunk=7, snapshot_every=0)
    try:
        yield s
    finally:
        await s.aclose()


async def _feed(svc: GatewayService, ns: str, n: int, seed: int = 0) -> list[str]:
    """``n`` applied observations in ``ns`` (random RM, intercept context, random reward)."""
    rng = np.random.default_rng(seed)
    st = await svc.store.get_namespace(ns)
    assert st is not None
    records = [(int(rng.integers(0, 2)), np.ones(1)) for _ in range(n)]
    ids = await svc.store.put_routes(ns, st.gen, records, ttl_s=600)
    rewards = rng.normal(-0.7, 0.3, size=n)
    res = await svc.store.apply_feedback(list(zip(ids, rewards.tolist(), strict=True)))
    assert all(r.outcome.value == "applied" for r in res)
    return ids


def _laser_state(st: NsState) -> tuple[np.ndarray, np.ndarray]:
    return st.policy.design.copy(), st.policy.target.copy()  # type: ignore[attr-defined]


async def test_state_does_not_depend_on_how_the_log_is_read(svc: GatewayService) -> None:
    """Chunks of 7, and an observation at a time as it lands, against one read of all:
    bayesian to 1e-12, laser exactly (it is folded one observation at a time)."""
    whole = _service(store=svc.store, log_read_chunk=4096, snapshot_every=0)
    try:
        for ns, policy in (("bay", "bayesian-no-offline"), ("las", "laser")):
            await svc.create_namespace(ns, NamespaceConfig(policy=policy))
            await _feed(svc, ns, 30, seed=1)
            await svc.namespaces.state(ns, force_refresh=True)  # 30 in chunks of 7
            for k in range(25):  # then one at a time, refreshing after each
                await _feed(svc, ns, 1, seed=100 + k)
                await svc.namespaces.state(ns, force_refresh=True)
            a = await svc.namespaces.state(ns, force_refresh=True)
            b = await whole.namespaces.state(ns, force_refresh=True)
            assert a.seq == b.seq == 55
            if policy == "laser":
                for x, y in zip(_laser_state(a), _laser_state(b), strict=True):
                    np.testing.assert_array_equal(x, y)
            else:
                pa, pb = a.policy.posteriors, b.policy.posteriors  # type: ignore[attr-defined]
                np.testing.assert_allclose(pa.means(), pb.means(), rtol=0, atol=1e-12)
    finally:
        await whole.aclose()


async def test_a_long_rebuild_is_folded_off_the_event_loop(svc: GatewayService) -> None:
    await svc.create_namespace("long", None)
    await _feed(svc, "long", 3000)
    fresh = _service(store=svc.store, log_read_chunk=3000, snapshot_every=0)
    try:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        t = asyncio.create_task(ticker())
        st = await fresh.namespaces.state("long")  # one chunk of 3000: folded in a worker thread
        t.cancel()
        assert st.seq == 3000
        assert ticks > 0  # the loop ran while the fold did
    finally:
        await fresh.aclose()


async def test_namespace_cap_and_window_bound(svc: GatewayService) -> None:
    capped = _service(store=EmbeddedStore(), max_namespaces=2)
    try:
        await capped.create_namespace("one", None)
        await capped.create_namespace("two", None)
        with pytest.raises(NamespaceLimit, match="max_namespaces 2"):
            await capped.create_namespace("three", None)
        await capped.create_namespace("one", None)  # the existing one is still fine
    finally:
        await capped.aclose()
    big = NamespaceConfig(policy="bayesian-no-offline", normalizer_params={"window": 300_000})
    with pytest.raises(ConfigError, match="window must be at most 16384"):
        await svc.create_namespace("big", big)
    with pytest.raises(InputError):
        await svc.create_namespace("bad:name", None)


async def test_a_log_that_went_backwards_is_rebuilt_and_logged(
    svc: GatewayService, caplog: pytest.LogCaptureFixture
) -> None:
    """The store loses its last 10 observations (restored from an older copy) and then takes
    12 others: the log is longer than before, but not what this replica folded. It notices
    (the entry at its seq is another route's), logs an error, rebuilds from the log, and
    agrees with a replica that only ever saw the new log."""
    await svc.create_namespace("back", None)
    await _feed(svc, "back", 40, seed=2)
    before = await svc.namespaces.state("back", force_refresh=True)
    assert before.seq == 40
    store = svc.store
    assert isinstance(store, EmbeddedStore)
    del store._ns["back"].log[30:]  # the restore
    await _feed(svc, "back", 12, seed=3)  # re-applied and new feedback: 42 entries
    with caplog.at_level(logging.ERROR, logger="reward_router.gateway"):
        after = await svc.namespaces.state("back", force_refresh=True)
    assert "the store's log does not hold what this replica folded" in caplog.text
    assert svc.metrics.rebuilds._value.get() == 1
    fresh = _service(store=store, log_read_chunk=4096, snapshot_every=0)
    try:
        truth = await fresh.namespaces.state("back")
        assert after.seq == truth.seq == 42
        pa, pb = after.policy.posteriors, truth.policy.posteriors  # type: ignore[attr-defined]
        np.testing.assert_allclose(pa.means(), pb.means(), rtol=0, atol=1e-12)
    finally:
        await fresh.aclose()


async def test_a_snapshot_ahead_of_the_log_is_not_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A replica snapshots at seq 20; the store's log then loses entries 16..20 while the
    snapshot stays (a snapshot ahead of its log): a fresh replica loading it finds the log
    does not hold seq 20, logs an error and folds the log from the prior instead."""
    svc = _service(log_read_chunk=4096, snapshot_every=20)
    try:
        await svc.create_namespace("snap", None)
        await _feed(svc, "snap", 20, seed=4)
        st = await svc.namespaces.state("snap", force_refresh=True)
        assert st.snapshot_seq == 20
        store = svc.store
        assert isinstance(store, EmbeddedStore)
        del store._ns["snap"].log[15:]
        fresh = _service(store=store, log_read_chunk=4096, snapshot_every=20)
        try:
            with caplog.at_level(logging.ERROR, logger="reward_router.gateway"):
                got = await fresh.namespaces.state("snap")
            assert "snapshot at 20" in caplog.text
            assert got.seq == 15 and got.snapshot_seq == 0
            # ...and it does not write its state as a snapshot past the log either.
            snap = await store.get_snapshot("snap", got.meta.gen)
            assert snap is not None and snap[0] == 20  # the old one, not a new one at 15+
        finally:
            await fresh.aclose()
    finally:
        await svc.aclose()


async def test_compaction_trims_the_log_and_replicas_rebuild_from_the_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``log_keep: 3`` with snapshots every 10: the log keeps the entries after the newest
    snapshot's seq - 3. A replica that fell behind the trimmed head, and a fresh one, rebuild
    from the snapshot silently (no error: nothing went backwards) and agree with the writer."""
    writer = _service(log_read_chunk=4096, snapshot_every=10, log_keep=3)
    store = writer.store
    assert isinstance(store, EmbeddedStore)
    lagging = _service(store=store, log_read_chunk=4096, snapshot_every=10)
    try:
        await writer.create_namespace("cmp", None)
        await _feed(writer, "cmp", 5, seed=5)
        assert (await lagging.namespaces.state("cmp")).seq == 5
        for k in range(4):
            await _feed(writer, "cmp", 10, seed=10 + k)
            await writer.namespaces.state("cmp", force_refresh=True)
        w = await writer.namespaces.state("cmp", force_refresh=True)
        assert w.seq == 45 and w.snapshot_seq == 45  # snapshots at 15, 25, 35, 45
        assert store._ns["cmp"].base == 42 and len(store._ns["cmp"].log) == 3
        with caplog.at_level(logging.ERROR, logger="reward_router.gateway"):
            # was at 5, head is at 43
            lag = await lagging.namespaces.state("cmp", force_refresh=True)
            fresh = _service(store=store, log_read_chunk=4096, snapshot_every=0)
            new = await fresh.namespaces.state("cmp")
            await fresh.aclose()
        assert caplog.text == ""
        for st in (lag, new):
            assert st.seq == 45
            pa, pb = st.policy.posteriors, w.policy.posteriors  # type: ignore[attr-defined]
            np.testing.assert_allclose(pa.means(), pb.means(), rtol=0, atol=1e-12)
    finally:
        await writer.aclose()
        await lagging.aclose()


async def _feed_audits(svc: GatewayService, ns: str, n: int, seed: int) -> None:
    """``n`` gold audit entries in ``ns``: their own records (route uid + the audit suffix)
    applied through the same exactly-once step, agreement 1, 0 or 0.5."""
    rng = np.random.default_rng(seed)
    st = await svc.store.get_namespace(ns)
    assert st is not None
    records = [(int(rng.integers(0, 2)), np.ones(1)) for _ in range(n)]
    uids = [audit_uid(new_uid()) for _ in range(n)]
    ids = await svc.store.put_routes(
        ns, st.gen, records, 600, uids=uids, uncount=[a for a, _ in records]
    )
    agree = rng.choice([0.0, 0.5, 1.0], size=n).tolist()
    res = await svc.store.apply_feedback(list(zip(ids, agree, strict=True)))
    assert all(r.outcome.value == "applied" for r in res)


async def test_audit_entries_skip_the_normaliser_and_fold_alike_however_read(
    svc: GatewayService,
) -> None:
    """A log of trainer feedback and gold audits, mixed: chunks of 7 and one read of all agree;
    the normaliser holds exactly the state of the feedback entries alone (audits never reach
    it); with forgetting (one observation at a time) too."""
    whole = _service(store=svc.store, log_read_chunk=4096, snapshot_every=0)
    audited = {"audit_rate": 0.5, "audit_rm": "b", "audit_accuracy": 0.8, "max_calls_per_pair": 1.5}
    try:
        for ns, params in (("mix", {}), ("mix-forget", {"forgetting": 0.95})):
            cfg = NamespaceConfig(policy="bayesian-no-offline", reward="correct", params=params)
            await svc.create_namespace(ns, cfg.model_copy(update=audited))
            await svc.create_namespace(ns + "-fb", cfg)
            for k in range(6):
                await _feed(svc, ns, 5, seed=10 + k)
                await _feed(svc, ns + "-fb", 5, seed=10 + k)
                await _feed_audits(svc, ns, 3, seed=20 + k)
                await svc.namespaces.state(ns, force_refresh=True)
            a = await svc.namespaces.state(ns, force_refresh=True)
            b = await whole.namespaces.state(ns, force_refresh=True)
            fb = await whole.namespaces.state(ns + "-fb", force_refresh=True)
            assert a.seq == b.seq == 48 and fb.seq == 30
            assert a.audit is not None and a.audit.link.accuracy == 0.8
            pa, pb = a.policy.posteriors, b.policy.posteriors  # type: ignore[attr-defined]
            np.testing.assert_allclose(pa.means(), pb.means(), rtol=0, atol=1e-12)
            assert a.normalizer.state() == fb.normalizer.state() == b.normalizer.state()
            assert int(a.obs_counts.sum()) == 48
            # The audits moved the posterior: it is not the feedback-only one.
            pf = fb.policy.posteriors  # type: ignore[attr-defined]
            assert np.abs(pa.precision - pf.precision).max() > 1.0
    finally:
        await whole.aclose()
