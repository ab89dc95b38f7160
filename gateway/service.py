"""The serving class: built once at start-up, kept on ``app.state``; the HTTP layer only calls it.

Per request it does, for ``/v1/route``: namespace state (it must exist: a route never creates
one) -> refresh from the store's log -> pair features (router artifact, in a worker thread) ->
the policy's draw -> one ``/v1/compare`` call per RM asked (concurrently), falling back along
the draw's ranking when an RM fails -> route records in the store -> labels. For
``/v1/feedback``: the store's atomic exactly-once step, then a refresh of the touched
namespaces.

Its parts, one job each: :class:`~gateway.contexts.Contexts` (pair -> context),
:class:`~gateway.namespaces.Namespaces` (config and state folded from the store's log) and
:class:`~gateway.dispatch.Dispatcher` (asking RMs, fallback, second opinions).

A replica's posterior for a namespace is always ``fold(prior, log[1..seq])``
(:func:`gateway.routing.fold.fold`): the log holds raw rewards, folded in sequence order, one
observation at a time through the namespace's normaliser, then into the policy. Two replicas
that have read the same prefix of the log hold the same state (to float rounding of batched
sums, far below 1e-9), whatever the order they routed or received feedback in. Staleness: a
replica re-reads the log tail before every route call (``refresh_interval_ms = 0``, one Redis
round trip of ~0.1 ms) or at most every ``refresh_interval_ms``; it also re-reads after each
feedback it applies and before every ``/v1/posteriors`` answer. So a route drawn on replica B
reflects every feedback acknowledged (on any replica) before B's last refresh, i.e. at most
``refresh_interval_ms`` old.

>>> service = GatewayService.build(load_settings("gateway.yaml"))   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.audits import Audits
from gateway.contexts import Contexts
from gateway.dispatch import AllRMsFailed, Dispatcher, labels
from gateway.metrics import GatewayMetrics
from gateway.namespaces import NamespaceConflict, Namespaces, NsState, UnknownNamespace
from gateway.rm_client import RMPool
from gateway.settings import NAMESPACE_RE, OPENRLHF_NAMESPACE, GatewaySettings
from gateway.store import FeedbackResult, Outcome, RouteId, Store, is_audit_uid, new_uid
from gateway.wiring import load_router, make_store, rm_clients
from reward_router.errors import RewardRouterError
from reward_router.heap import freeze_startup_heap
from reward_router.protocol import (
    FeedbackRequest,
    FeedbackResponse,
    NamespaceConfig,
    NamespaceInfo,
    PairIn,
    PosteriorParams,
    PosteriorsResponse,
    RMPosterior,
    RouteRequest,
    RouteResponse,
)

__all__ = [
    "AllRMsFailed",
    "GatewayService",
    "InputError",
    "NamespaceConflict",
    "Timing",
    "UnknownNamespace",
]

log = logging.getLogger("reward_router.gateway")


class InputError(RewardRouterError):
    """The caller's request is invalid; names the field (HTTP 422)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def _startup_config(ns: str) -> NamespaceConfig | None:
    """A start-up namespace's config: the policy defaults; OpenRLHF's learns from correctness
    (its feedback is the gateway's own audit of each comparison, gateway/openrlhf.py)."""
    if ns == OPENRLHF_NAMESPACE:
        return NamespaceConfig(reward="correct", normalizer="none")
    return None


def _check_ns(ns: str) -> None:
    if not NAMESPACE_RE.match(ns):
        raise InputError("namespace", f"must match {NAMESPACE_RE.pattern}, got {ns!r}")


@dataclass
class Timing:
    """Where one request's time went (seconds)."""

    total: float = 0.0
    rm_wait: float = 0.0
    encode: float = 0.0
    store_wait: float = 0.0  # part of the overhead: the state read and record writes awaited

    @property
    def overhead(self) -> float:
        return max(0.0, self.total - self.rm_wait)

    @contextlib.contextmanager
    def waiting_for_store(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.store_wait += time.perf_counter() - t0


# ---- the service ---------------------------------------------------------------------------------


class GatewayService:
    """Everything a gateway replica does, independent of HTTP."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: Store,
        contexts: Contexts,
        pool: RMPool,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.contexts = contexts
        self.pool = pool
        self.metrics = metrics
        self.n_rms = len(pool.clients)
        self.durability_warning: str | None = None
        self._startup_pending = set(settings.startup_namespaces)
        self.namespaces = Namespaces(settings, store, contexts, metrics, pool.names)
        needs_reference = np.array(self.namespaces.needs_reference, dtype=bool)
        self.dispatcher = Dispatcher(pool, metrics, needs_reference)
        self.audits = Audits(
            self.dispatcher, store, metrics, seed=settings.seed, route_ttl_s=settings.route_ttl_s
        )

    @classmethod
    def build(cls, settings: GatewaySettings) -> GatewayService:
        """Load the router artifact and encoder, connect the store, make the RM clients
        (:mod:`gateway.wiring`)."""
        router, featurizer = load_router(settings)
        rm_order = list(router.rms) if router is not None else [r.name for r in settings.rms]
        pool = RMPool(rm_clients(settings, rm_order), settings.health_interval_s)
        metrics = GatewayMetrics(rm_order, settings.max_metric_namespaces)
        return cls(settings, make_store(settings), Contexts(router, featurizer), pool, metrics)

    async def start(self) -> None:
        await self.pool.start()
        self._update_rm_gauges()
        await self._check_durability()
        await self._create_startup_namespaces()
        freeze_startup_heap()  # ~430k objects never garbage: why, in reward_router/heap.py

    async def _create_startup_namespaces(self) -> None:
        """Create ``startup_namespaces`` that are missing, once per process (retried from
        /readyz while the store is down). Never later: a namespace lost while this process runs
        stays 404 until someone creates it again, it does not come back from the defaults."""
        for ns in list(self._startup_pending):
            try:
                info = await self.create_namespace(ns, _startup_config(ns))
            except NamespaceConflict:
                info = None  # exists with its own config: used as it is
            except RewardRouterError as exc:
                log.warning("could not create start-up namespace %s yet: %s", ns, exc)
                return
            if info is not None and info.created:
                log.warning("namespace %s created from the policy defaults (start-up)", ns)
            self._startup_pending.discard(ns)

    async def _check_durability(self) -> str | None:
        """The store's durability warning: logged (at start-up), a gauge, and /readyz's body."""
        try:
            warning = await self.store.durability_warning()
        except RewardRouterError:
            return self.durability_warning  # unreachable now: keep the last answer
        self.metrics.store_durable.set(0 if warning else 1)
        if warning and warning != self.durability_warning:
            log.warning("NOT DURABLE: %s", warning)
        self.durability_warning = warning
        return warning

    async def aclose(self) -> None:
        await self.pool.aclose()
        await self.contexts.aclose()
        await self.store.aclose()

    @property
    def rm_names(self) -> list[str]:
        return self.pool.names

    # ---- readiness -------------------------------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {"router": True, "store": True, "rms": {}}
        try:
            await self.store.ping()
        except RewardRouterError as exc:
            checks["store"] = str(exc)
        checks["rms"] = {c.name: c.available() for c in self.pool.clients}
        if checks["store"] is True:
            await self._check_durability()
            await self._create_startup_namespaces()
        # Ready either way (a memory-only gateway works), but never silently: the body says so.
        checks["durable"] = self.durability_warning is None
        if self.durability_warning:
            checks["warning"] = self.durability_warning
        self._update_rm_gauges()
        checks["ready"] = checks["store"] is True and any(checks["rms"].values())
        return checks

    def _update_rm_gauges(self) -> None:
        for c in self.pool.clients:
            self.metrics.rm_available.labels(c.name).set(1 if c.available() else 0)

    # ---- namespaces (HTTP: /v1/namespaces) ----------------------------------------------------

    async def create_namespace(self, ns: str, req: NamespaceConfig | None) -> NamespaceInfo:
        _check_ns(ns)
        return await self.namespaces.create(ns, req)

    async def reset_namespace(self, ns: str) -> NamespaceInfo:
        _check_ns(ns)
        return await self.namespaces.reset(ns)

    async def delete_namespace(self, ns: str) -> None:
        _check_ns(ns)
        await self.namespaces.delete(ns)

    async def list_namespaces(self) -> list[str]:
        return await self.namespaces.names()

    # ---- route ---------------------------------------------------------------------------------

    def _check_sizes(self, pairs: Sequence[PairIn]) -> None:
        limit = self.settings.max_text_chars
        if len(pairs) > self.settings.max_pairs:
            raise InputError("pairs", f"at most {self.settings.max_pairs} pairs per request")
        for i, p in enumerate(pairs):
            prompt_len = (
                len(p.prompt)
                if isinstance(p.prompt, str)
                else sum(len(m.content) for m in p.prompt)
            )
            sizes = {
                "prompt": prompt_len,
                "response_a": len(p.response_a),
                "response_b": len(p.response_b),
                "reference": len(p.reference or ""),
            }
            for name, n in sizes.items():
                if n > limit:
                    raise InputError(f"pairs.{i}.{name}", f"longer than {limit} characters")

    async def route(self, req: RouteRequest) -> tuple[RouteResponse, Timing]:
        t_start = time.perf_counter()
        timing = Timing()
        self._check_sizes(req.pairs)
        # The log refresh (a store read) runs while the pairs are encoded.
        state_task = asyncio.ensure_future(self.namespaces.state(req.namespace))
        t0 = time.perf_counter()
        try:
            h = await self.contexts(req.pairs)
        except BaseException:
            state_task.cancel()
            raise
        timing.encode = time.perf_counter() - t0
        self.metrics.encode.observe(timing.encode)
        with timing.waiting_for_store():
            st = await state_task
        selection, ranking = self.dispatcher.select(st.policy, h, req.pairs)
        ensemble = st.policy.calls_per_pair > 1
        first = self.dispatcher.first_round(ranking, np.asarray(selection.asked), ensemble)
        # Route records are written while the RMs work, under the RM planned for each pair;
        # the few that end up answered by a fallback RM are rewritten before the response, so
        # no feedback (which needs the response's route id) can see the planned one.
        uids = [new_uid() for _ in req.pairs]
        planned = [next(int(a) for a in ranking[i] if int(a) in f) for i, f in enumerate(first)]
        write = asyncio.ensure_future(
            self.store.put_routes(
                req.namespace,
                st.meta.gen,
                [(a, h[i]) for i, a in enumerate(planned)],
                self.settings.route_ttl_s,
                uids=uids,
            )
        )
        payloads = [p.model_dump(exclude={"id"}, exclude_none=True) for p in req.pairs]
        # Gold audits (gateway/audits.py): the auditor works while the routed RMs do.
        audited = self.audits.select(st, uids, planned, req.pairs)
        audit = asyncio.ensure_future(self.audits.ask(st, audited, payloads)) if audited else None
        try:
            answers, timing.rm_wait = await self.dispatcher.dispatch(payloads, ranking, first)
            if not ensemble:
                timing.rm_wait += await self.dispatcher.second_opinions(
                    st, req.namespace, ranking, answers, payloads
                )
        except BaseException:
            if audit is not None:
                audit.cancel()
            with contextlib.suppress(BaseException):
                await write
            raise
        with timing.waiting_for_store():
            ids = await write

        combine = st.policy.combine if ensemble else None
        arms, results = labels(req.pairs, answers, ranking, ids, self.rm_names, combine)
        ns_label = self.metrics.ns_label(req.namespace)
        for arm in arms:
            self.metrics.routes.labels(ns_label, self.rm_names[arm]).inc()
        moved = [i for i, arm in enumerate(arms) if arm != planned[i]]
        if moved:
            try:
                with timing.waiting_for_store():
                    await self.store.put_routes(
                        req.namespace,
                        st.meta.gen,
                        [(arms[i], h[i]) for i in moved],
                        self.settings.route_ttl_s,
                        uids=[uids[i] for i in moved],
                        uncount=[planned[i] for i in moved],
                    )
            except BaseException:
                if audit is not None:
                    audit.cancel()
                raise
        if audit is not None:
            t0 = time.perf_counter()
            audit_answers = await audit
            timing.rm_wait += time.perf_counter() - t0
            await self.audits.settle(st, h, audited, audit_answers, arms, results, uids)
        timing.total = time.perf_counter() - t_start
        self._update_rm_gauges()
        return RouteResponse(namespace=req.namespace, results=results), timing

    # ---- the parts of a route, for callers that route in their own way (OpenRLHF) ------------

    async def choose(self, st: NsState, pairs: Sequence[PairIn]) -> list[int]:
        """The RM the policy of namespace state ``st`` draws for each pair (reference-needing RMs
        last for pairs without one, an available RM first), without asking any RM or writing a
        record."""
        self._check_sizes(pairs)
        h = await self.contexts(pairs)
        ranking = self.dispatcher.select(st.policy, h, pairs)[1]
        return [self.dispatcher.order(ranking[i], set())[0] for i in range(len(pairs))]

    async def record(
        self, ns: str, gen: str, arms: list[int], pairs: Sequence[PairIn]
    ) -> list[str]:
        """Route records of pairs answered by ``arms`` (feedback on their ids is applied like
        any route's); counted in the routes metric."""
        h = await self.contexts(pairs)
        ids = await self.store.put_routes(
            ns, gen, [(a, h[i]) for i, a in enumerate(arms)], self.settings.route_ttl_s
        )
        label = self.metrics.ns_label(ns)
        for a in arms:
            self.metrics.routes.labels(label, self.rm_names[a]).inc()
        return ids

    # ---- feedback ------------------------------------------------------------------------------

    async def feedback(self, req: FeedbackRequest) -> FeedbackResponse:
        if len(req.feedback) > self.settings.max_feedback:
            raise InputError("feedback", f"at most {self.settings.max_feedback} items per request")
        items = [(f.route_id, f.reward) for f in req.feedback]
        # A gold audit's id is the gateway's own to apply: a trainer's post of one is unknown.
        own = [i for i, (rid, _) in enumerate(items) if not _is_audit_id(rid)]
        applied = await self.store.apply_feedback([items[i] for i in own])
        results = [FeedbackResult(Outcome.UNKNOWN)] * len(items)
        for i, r in zip(own, applied, strict=True):
            results[i] = r
        counts = {o: 0 for o in Outcome}
        touched: set[str] = set()
        for (_, reward), r in zip(items, results, strict=True):
            counts[r.outcome] += 1
            if r.outcome is Outcome.APPLIED and r.namespace is not None:
                touched.add(r.namespace)
                known = r.arm is not None and 0 <= r.arm < self.n_rms
                rm = self.rm_names[r.arm] if known and r.arm is not None else "_unknown"
                self.metrics.reward.labels(self.metrics.ns_label(r.namespace), rm).observe(reward)
        for o, n in counts.items():
            if n:
                self.metrics.feedback.labels(o.value).inc(n)
        for ns in touched:
            st = self.namespaces.held(ns)
            if st is not None:
                # Applied and durable already; a failed refresh only delays this replica's view.
                with contextlib.suppress(RewardRouterError):
                    await self.namespaces.refresh(st, force=True)
        return FeedbackResponse(
            applied=counts[Outcome.APPLIED],
            duplicate=counts[Outcome.DUPLICATE],
            unknown=counts[Outcome.UNKNOWN],
        )

    # ---- posteriors ----------------------------------------------------------------------------

    async def posteriors(self, ns: str, *, full: bool = False) -> PosteriorsResponse:
        _check_ns(ns)
        st = await self.namespaces.state(ns, force_refresh=True)
        routes = await self.store.route_counts(ns, st.meta.gen)
        summary = self.namespaces.posterior_gauges(st)
        norms: list[float | None] = [None] * self.n_rms
        unc: list[float | None] = [None] * self.n_rms
        params = None
        if summary is not None:
            norms, unc = list(summary[0]), list(summary[1])
            if full:
                post = st.policy.posteriors  # type: ignore[attr-defined]
                params = PosteriorParams(
                    means=post.means().tolist(),
                    eta=post.eta.tolist(),
                    precision=post.precision.tolist(),
                )
        rms = [
            RMPosterior(
                name=c.name,
                observations=int(st.obs_counts[n]),
                routes=routes.get(n, 0),
                mean_norm=norms[n],
                uncertainty=unc[n],
                healthy=c.healthy,
                in_cooldown=c.in_cooldown(),
            )
            for n, c in enumerate(self.pool.clients)
        ]
        return PosteriorsResponse(
            namespace=ns,
            policy=st.policy.name,
            seq=st.seq,
            snapshot_seq=st.snapshot_seq,
            rms=rms,
            params=params,
        )


def _is_audit_id(route_id: str) -> bool:
    """Whether ``route_id`` names a gold audit's entry (:func:`gateway.store.is_audit_uid`)."""
    rid = RouteId.parse(route_id)
    return rid is not None and is_audit_uid(rid.uid)
