"""Namespaces (one per training run) and this replica's state of each, folded from the store.

A replica's posterior for a namespace is always ``fold(prior, log[1..seq])``
(:func:`gateway.routing.fold.fold`): the log holds raw rewards, folded in sequence order. Before
a route the state is brought up to the store's log (:meth:`Namespaces.state`), in chunks, from a
snapshot when one is stored; a log that went backwards (a store restored from an older copy)
or was trimmed past this replica's position is noticed and the state rebuilt.

>>> namespaces = Namespaces(settings, store, contexts, metrics, rm_names)   # doctest: +SKIP
>>> st = await namespaces.state("default")                                  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway import snapshots
from gateway.contexts import Contexts
from gateway.metrics import GatewayMetrics
from gateway.policy_setup import AuditPlan, NsPolicy, build_policy, default_audit_accuracy
from gateway.routing.fold import fold
from gateway.routing.prior import RewardLink
from gateway.settings import GatewaySettings
from gateway.store import NamespaceMeta, Observation, Store, StoreUnavailable
from reward_router.errors import RewardRouterError
from reward_router.protocol import NamespaceConfig, NamespaceInfo

if TYPE_CHECKING:
    from gateway.routing import Policy

log = logging.getLogger("reward_router.gateway")

#: A log tail longer than this is folded in a worker thread (on a copy, swapped in after), so a
#: rebuild of a long log never blocks /healthz or other namespaces' routes.
FOLD_INLINE = 256


class UnknownNamespace(RewardRouterError):
    """A call named a namespace that does not exist (HTTP 404). Routes never create one: a
    namespace lost with its store must not come back silently with the default policy."""

    def __init__(self, ns: str) -> None:
        self.namespace = ns
        super().__init__(
            f"namespace {ns!r} does not exist: create it with POST /v1/namespaces/{ns} "
            "(a route never creates one)"
        )


class NamespaceConflict(RewardRouterError):
    """The namespace exists with another config, or was built for another router (HTTP 409)."""


@dataclass
class NsState:
    """One namespace as this replica holds it: its policy folded up to log position ``seq``."""

    meta: NamespaceMeta
    policy: Policy
    normalizer: Any
    forgetting: bool
    link: RewardLink = field(default_factory=RewardLink)
    audit: AuditPlan | None = None
    seq: int = 0
    #: pairs routed, second opinions and gold audits asked by this replica (the
    #: max_calls_per_pair budget)
    pairs_routed: int = 0
    second_opinions: int = 0
    audits: int = 0
    obs_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    snapshot_seq: int = 0
    # The route id of the observation at ``seq``: each read overlaps it, so a log that went
    # backwards (a store restored from an older copy) is noticed even once it has grown again.
    last_route_id: str | None = None
    last_refresh: float = -math.inf
    inflight: asyncio.Future[NsState] | None = None
    inflight_started: float = -math.inf


class Namespaces:
    """This replica's namespaces: config, creation, and state kept up to the store's log."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: Store,
        contexts: Contexts,
        metrics: GatewayMetrics,
        rm_names: list[str],
    ) -> None:
        self.settings = settings
        self.store = store
        self.contexts = contexts
        self.metrics = metrics
        self.rm_names = rm_names
        self.n_rms = len(rm_names)
        by_name = {r.name: r for r in settings.rms}
        #: per RM: it can only abstain without the pair's reference (a verifier)
        self.needs_reference = [bool(n in by_name and by_name[n].needs_reference) for n in rm_names]
        self._ns: dict[str, NsState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        d = settings.policy
        self.default_config: dict[str, Any] = {
            "policy": d.name,
            "params": dict(d.params),
            "normalizer": d.normalizer,
            "normalizer_params": dict(d.normalizer_params),
            "best_rm": d.best_rm,
            "reward": d.reward,
            "dpo_informativeness": d.dpo_informativeness,
            "max_calls_per_pair": d.max_calls_per_pair,
        }

    # ---- config ----------------------------------------------------------------------------

    def policy_from(self, ns: str, config: dict[str, Any]) -> NsPolicy:
        return build_policy(
            ns,
            config,
            rm_names=self.rm_names,
            dim=self.contexts.dim,
            router=self.contexts.router,
            seed=self.settings.seed,
        )

    def full_config(self, req: NamespaceConfig | None) -> dict[str, Any]:
        cfg = dict(self.default_config)
        if req is not None:
            given = req.model_dump(exclude_none=True)
            if "policy" in given and "params" not in given:
                cfg["params"] = {}  # the defaults' params belong to the defaults' policy
            cfg.update(given)
        if cfg.get("audit_rate") and cfg.get("audit_rm") in self.rm_names:
            # Pinned in the stored config, so every replica (and a later router) audits alike.
            cfg.setdefault("audit_accuracy", None)
            if cfg["audit_accuracy"] is None:
                cfg["audit_accuracy"] = default_audit_accuracy(
                    cfg, self.rm_names, self.contexts.router, self.needs_reference
                )
        cfg["rms"] = self.rm_names
        cfg["dim"] = self.contexts.dim
        return cfg

    def _new_state(self, meta: NamespaceMeta) -> NsState:
        cfg = meta.config
        if cfg.get("rms") != self.rm_names or cfg.get("dim") != self.contexts.dim:
            raise NamespaceConflict(
                f"namespace {meta.name!r} was created for RMs {cfg.get('rms')} and dim "
                f"{cfg.get('dim')}, this gateway has {self.rm_names} and {self.contexts.dim}; "
                "reset or delete it (admin) to reuse the name"
            )
        built = self.policy_from(meta.name, cfg)
        return NsState(
            meta,
            built.policy,
            built.normalizer,
            built.forgetting,
            built.link,
            built.audit,
            obs_counts=np.zeros(self.n_rms, dtype=np.int64),
        )

    # ---- create, reset, delete (HTTP: /v1/namespaces) ------------------------------------------

    async def create(self, ns: str, req: NamespaceConfig | None) -> NamespaceInfo:
        config = self.full_config(req)
        self.policy_from(ns, config)  # validate before anything is stored
        meta, created = await self.store.create_namespace(
            ns, config, limit=self.settings.max_namespaces
        )
        if not created and meta.config != config:
            raise NamespaceConflict(
                f"namespace {ns!r} exists with another config {meta.config}; reset or delete it"
            )
        return NamespaceInfo(namespace=ns, created=created, config=meta.config)

    async def reset(self, ns: str) -> NamespaceInfo:
        meta = await self.store.reset_namespace(ns)
        if meta is None:
            raise UnknownNamespace(ns)
        self._ns.pop(ns, None)
        return NamespaceInfo(namespace=ns, created=False, config=meta.config)

    async def delete(self, ns: str) -> None:
        if not await self.store.delete_namespace(ns):
            raise UnknownNamespace(ns)
        self._ns.pop(ns, None)

    async def names(self) -> list[str]:
        return await self.store.list_namespaces()

    # ---- state -------------------------------------------------------------------------------

    def held(self, ns: str) -> NsState | None:
        """The state this replica holds of ``ns`` (no store read), if any."""
        return self._ns.get(ns)

    def _lock_for(self, ns: str) -> asyncio.Lock:
        lock = self._locks.get(ns)
        if lock is None:
            lock = self._locks[ns] = asyncio.Lock()
        return lock

    async def state(self, ns: str, *, force_refresh: bool = False) -> NsState:
        """This replica's state of an existing namespace, refreshed from the store's log."""
        st = self._ns.get(ns)
        if st is None:
            try:
                async with self._lock_for(ns):
                    st = self._ns.get(ns)
                    if st is None:
                        meta = await self.store.get_namespace(ns)
                        if meta is None:
                            raise UnknownNamespace(ns)
                        st = self._new_state(meta)
                        await self._load_snapshot(st)
                        self._ns[ns] = st
            finally:
                if ns not in self._ns:  # no lock left behind for every unknown name probed
                    self._locks.pop(ns, None)
        return await self.refresh(st, force=force_refresh)

    async def refresh(self, st: NsState, *, force: bool) -> NsState:
        """Bring ``st`` up to the store's log (single-flight: concurrent callers share one read).

        A route joins a refresh already in flight (so 200 concurrent routes cost one store round
        trip, not 200 queued ones); ``force`` (after a feedback, for /v1/posteriors) waits for
        one that started after the call, so it sees everything acknowledged before it.
        """
        interval = self.settings.refresh_interval_ms / 1000.0
        if not force and interval > 0 and time.monotonic() - st.last_refresh < interval:
            return st
        called = time.monotonic()
        while True:
            task = st.inflight
            if task is not None and not task.done():
                if not force or st.inflight_started >= called:
                    return await asyncio.shield(task)
                with contextlib.suppress(Exception):
                    await asyncio.shield(task)  # an older read: wait for it, then read anew
                continue
            st.inflight_started = time.monotonic()
            st.inflight = asyncio.ensure_future(self._read_log(st))
            return await asyncio.shield(st.inflight)

    async def _read_log(self, st: NsState) -> NsState:
        ns = st.meta.name
        started = time.monotonic()
        chunk = self.settings.log_read_chunk
        rebuilt = 0
        while True:  # chunked: at most log_read_chunk observations per store read
            overlap = 1 if st.seq else 0  # re-read the last folded entry, to check it
            meta, tail, length = await self.store.read_tail(
                ns, st.meta.gen, st.seq - overlap, chunk + overlap
            )
            if meta is None:  # deleted (by an admin, maybe on another replica), or lost
                if self._ns.get(ns) is st:
                    del self._ns[ns]
                log.warning("namespace %s is gone from the store (deleted or lost): 404", ns)
                raise UnknownNamespace(ns)
            if meta.gen != st.meta.gen:  # reset elsewhere: start over from the new generation
                st = self._ns[ns] = self._new_state(meta)
                continue
            fits = _matches(st, tail) if overlap else not tail or tail[0].seq == 1
            if not fits:
                # Behind a trimmed head (compaction), or the log is not what was folded (it
                # went backwards, a snapshot ahead of it): rebuild from the store's snapshot,
                # and if that does not fit the log either, from the prior.
                if rebuilt > 1:  # the log changed under the rebuild itself: next refresh
                    raise StoreUnavailable(f"namespace {ns}: the log changed while rebuilding")
                trimmed = bool(tail) and tail[0].seq > st.seq and rebuilt == 0
                if not trimmed:
                    self._log_backwards(st, tail, length)
                st = self._ns[ns] = self._new_state(meta)
                if rebuilt == 0:
                    await self._load_snapshot(st, always=True)
                rebuilt += 1
                continue
            await self._fold_async(st, tail[overlap:])
            if len(tail) - overlap < chunk:
                break
        st.last_refresh = started
        if tail:
            self.posterior_gauges(st)
        every = self.settings.snapshot_every
        if every and st.seq - st.snapshot_seq >= every and st.seq <= length:
            with contextlib.suppress(RewardRouterError):  # a snapshot is an optimisation
                await self._save_snapshot(st)
        return st

    def _log_backwards(self, st: NsState, tail: list[Observation], length: int) -> None:
        self.metrics.rebuilds.inc()
        got = tail[0].route_id if tail and tail[0].seq == st.seq else None
        log.error(
            "namespace %s: the store's log does not hold what this replica folded (folded up "
            "to seq %d%s, entry %s; the log now has %d entries, entry there %s): the log went "
            "backwards (a store restored from an older copy, a failover to a lagging replica) "
            "or a snapshot is ahead of it; rebuilding from the store's log, no snapshot written "
            "from the old state",
            st.meta.name,
            st.seq,
            f" (snapshot at {st.snapshot_seq})" if st.snapshot_seq else "",
            st.last_route_id,
            length,
            got,
        )

    async def _fold_async(self, st: NsState, tail: list[Observation]) -> None:
        """:func:`_fold`, in a worker thread on a copy for a long tail (swapped in after), so
        the event loop keeps serving while a long log is rebuilt."""
        if len(tail) <= FOLD_INLINE:
            _fold(st, tail, self.n_rms)
            return
        work = copy.copy(st)
        work.policy = copy.deepcopy(st.policy)
        work.normalizer = copy.deepcopy(st.normalizer)
        work.obs_counts = st.obs_counts.copy()
        await asyncio.to_thread(_fold, work, tail, self.n_rms)
        st.policy, st.normalizer, st.obs_counts = work.policy, work.normalizer, work.obs_counts
        st.seq, st.last_route_id = work.seq, work.last_route_id

    def posterior_gauges(self, st: NsState) -> tuple[list[float], list[float]] | None:
        """Per RM: norm of the posterior mean and sqrt(mean diagonal of the covariance); also
        exported as gauges. None for policies without a posterior."""
        post = getattr(st.policy, "posteriors", None)
        if post is None:
            return None
        means = post.means()
        cov = post.covariances()
        norms = [float(np.linalg.norm(means[n])) for n in range(self.n_rms)]
        unc = [float(np.sqrt(np.mean(np.diagonal(cov[n])))) for n in range(self.n_rms)]
        label = self.metrics.ns_label(st.meta.name)
        for n, name in enumerate(self.rm_names):
            self.metrics.posterior_mean_norm.labels(label, name).set(norms[n])
            self.metrics.posterior_uncertainty.labels(label, name).set(unc[n])
        return norms, unc

    # ---- snapshots: the folded state at a sequence number ---------------------------------------

    async def _save_snapshot(self, st: NsState) -> None:
        if not snapshots.snapshottable(st.policy):
            return
        blob = snapshots.encode(
            st.policy.posteriors,  # type: ignore[attr-defined]
            st.obs_counts,
            st.seq,
            st.normalizer.state() if st.normalizer is not None else None,
            st.last_route_id,
        )
        # The store writes it only if its log still holds this entry at seq: a snapshot is
        # never ahead of the log it came from (the log may have gone backwards since the read).
        last_uid = st.last_route_id.rsplit(":", 1)[-1] if st.last_route_id else None
        stored = await self.store.put_snapshot(
            st.meta.name, st.meta.gen, st.seq, blob, last_uid=last_uid
        )
        st.snapshot_seq = st.seq
        keep = self.settings.log_keep
        if stored and keep is not None and st.seq > keep:
            await self.store.trim_log(st.meta.name, st.meta.gen, st.seq - keep)

    async def _load_snapshot(self, st: NsState, *, always: bool = False) -> None:
        """The store's snapshot into ``st``; ``always``: even with ``snapshot_every: 0`` (a
        rebuild behind a trimmed log head needs it)."""
        if not (self.settings.snapshot_every or always) or not snapshots.snapshottable(st.policy):
            return
        got = await self.store.get_snapshot(st.meta.name, st.meta.gen)
        if got is None:
            return
        try:
            snap = snapshots.decode(got[1])
            st.policy.posteriors = snap.posteriors  # type: ignore[attr-defined]
            if st.normalizer is not None:
                st.normalizer = type(st.normalizer).from_state(snap.normalizer_state)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            # Unreadable (another version, another policy config): the log is the truth.
            log.warning("ignoring snapshot of %s: %s", st.meta.name, exc)
            st.policy, st.normalizer, st.forgetting, st.link, st.audit = self.policy_from(
                st.meta.name, st.meta.config
            )
            return
        st.obs_counts = snap.obs_counts
        st.seq = st.snapshot_seq = snap.seq
        st.last_route_id = snap.last_route_id


def _matches(st: NsState, tail: list[Observation]) -> bool:
    """Whether the store's entry at ``st.seq`` (the first of ``tail``) is the one folded."""
    if not tail or tail[0].seq != st.seq:
        return False
    return st.last_route_id is None or tail[0].route_id == st.last_route_id


def _fold(st: NsState, tail: list[Observation], n_rms: int) -> None:
    """Fold log entries (in sequence order) into ``st`` and advance its position."""
    if not tail:
        return
    if tail[0].seq != st.seq + 1:
        raise RuntimeError(f"log gap: have {st.seq}, got {tail[0].seq}")
    arms = np.array([o.arm for o in tail], dtype=np.int64)
    fold(
        st.policy,
        st.normalizer,
        st.link,
        np.array([o.reward for o in tail], dtype=np.float64),
        arms,
        np.stack([o.h for o in tail]),
        per_item=st.forgetting or not snapshots.snapshottable(st.policy),
        audit=np.array([o.audit for o in tail], dtype=bool),
        audit_link=st.audit.link if st.audit is not None else None,
    )
    st.obs_counts += np.bincount(arms, minlength=n_rms)
    st.seq = tail[-1].seq
    st.last_route_id = tail[-1].route_id
