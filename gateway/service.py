"""The serving class: built once at start-up, kept on ``app.state``; the HTTP layer only calls it.

Per request it does, for ``/v1/route``: namespace state (it must exist: a route never creates
one) -> refresh from the store's log -> pair features (router artifact, in a worker thread) ->
the policy's draw -> one ``/v1/compare`` call per RM asked (concurrently), falling back along
the draw's ranking when an RM fails -> route records in the store -> labels. For
``/v1/feedback``: the store's atomic exactly-once step, then a refresh of the touched
namespaces.

A replica's posterior for a namespace is always ``fold(prior, log[1..seq])``: the log holds raw
rewards, folded in sequence order, one observation at a time through the namespace's normaliser,
then into the policy. Two replicas that have read the same prefix of the log hold the same state
(to float rounding of batched sums, far below 1e-9), whatever the order they routed or received
feedback in. Staleness: a replica re-reads the log tail before every route call
(``refresh_interval_ms = 0``, one Redis round trip of ~0.1 ms) or at most every
``refresh_interval_ms``; it also re-reads after each feedback it applies and before every
``/v1/posteriors`` answer. So a route drawn on replica B reflects every feedback acknowledged
(on any replica) before B's last refresh, i.e. at most ``refresh_interval_ms`` old.

>>> service = GatewayService.build(load_settings("gateway.yaml"))   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import json
import logging
import math
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gateway.metrics import GatewayMetrics
from gateway.protocol import (
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
    RouteResult,
)
from gateway.rm_client import Comparison, RMClient, RMPool, RMRejected, RMUnavailable
from gateway.routing.prior import RewardLink
from gateway.settings import NAMESPACE_RE, GatewaySettings
from gateway.store import (
    EmbeddedStore,
    NamespaceMeta,
    Observation,
    Outcome,
    Store,
    StoreUnavailable,
    new_uid,
)
from reward_router.errors import ConfigError, DataFormatError, RewardRouterError

if TYPE_CHECKING:
    from gateway.routing import Policy

log = logging.getLogger("reward_router.gateway")


# ---- errors the HTTP layer maps (gateway/api.py) ----------------------------------------------


class InputError(RewardRouterError):
    """The caller's request is invalid; names the field (HTTP 422)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


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


class AllRMsFailed(RewardRouterError):
    """Every RM of a pair's ranking failed (HTTP 503)."""


# ---- pair features -----------------------------------------------------------------------------


class Router(Protocol):
    """What the gateway needs of ``gateway.offline.router.OfflineRouter``."""

    rms: list[str]
    encoder_ref: str

    @property
    def dim(self) -> int: ...

    @property
    def prior_means(self) -> np.ndarray: ...

    def hidden(self, pair_feats: np.ndarray) -> np.ndarray: ...


class Featurizer(Protocol):
    def featurize(
        self, prompts: Sequence[Any], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> np.ndarray: ...


class Contexts:
    """Pair -> context h. With a router: encoder + MLP (+ intercept), computed in one worker
    thread, never on the event loop; concurrent requests are encoded together in one batch
    (up to ``max_batch`` pairs). Without a router: h = [1] (the intercept alone)."""

    def __init__(
        self, router: Router | None, featurizer: Featurizer | None, max_batch: int = 64
    ) -> None:
        self.router = router
        self.featurizer = featurizer
        self.dim = router.dim if router is not None else 1
        self.prior_means = router.prior_means if router is not None else None
        self.max_batch = max_batch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rr-encode")
        self._queue: asyncio.Queue[tuple[list[PairIn], asyncio.Future[np.ndarray]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    def compute(self, pairs: Sequence[PairIn]) -> np.ndarray:
        """(B, dim) float64 contexts, synchronously (what the worker thread runs)."""
        if self.router is None or self.featurizer is None:
            return np.ones((len(pairs), 1))
        prompts = [
            p.prompt if isinstance(p.prompt, str) else [m.model_dump() for m in p.prompt]
            for p in pairs
        ]
        feats = self.featurizer.featurize(
            prompts, [p.response_a for p in pairs], [p.response_b for p in pairs]
        )
        return np.asarray(self.router.hidden(feats), dtype=np.float64)

    async def __call__(self, pairs: Sequence[PairIn]) -> np.ndarray:
        if self.router is None:
            return self.compute(pairs)
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((list(pairs), fut))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0][0])
            while size < self.max_batch and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                size += len(jobs[-1][0])
            allpairs = [p for pairs, _ in jobs for p in pairs]
            try:
                h = await loop.run_in_executor(self._pool, self.compute, allpairs)
            except Exception as exc:  # handed to every waiting request, the loop lives on
                for _, fut in jobs:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            start = 0
            for pairs, fut in jobs:
                if not fut.done():
                    fut.set_result(h[start : start + len(pairs)])
                start += len(pairs)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- namespaces ----------------------------------------------------------------------------------


#: Largest quantile window a namespace may ask for: each observation sorts the window, so at
#: 300k values one feedback cost 6.7 ms on the event loop and a rebuild was quadratic.
MAX_WINDOW = 16_384

#: A log tail longer than this is folded in a worker thread (on a copy, swapped in after), so a
#: rebuild of a long log never blocks /healthz or other namespaces' routes.
FOLD_INLINE = 256


def make_normalizer(kind: str, params: dict[str, Any]) -> Any:
    from gateway.routing import QuantileNormalizer, ZScoreNormalizer

    window = params.get("window")
    if kind == "quantile" and isinstance(window, int) and window > MAX_WINDOW:
        raise ConfigError("normalizer_params", f"window must be at most {MAX_WINDOW}, got {window}")
    if kind == "none":
        if params:
            raise ConfigError("normalizer_params", "must be empty for normalizer 'none'")
        return None
    cls = QuantileNormalizer if kind == "quantile" else ZScoreNormalizer
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError("normalizer_params", f"{exc}") from None


def prior_kwargs(router: Any) -> dict[str, Any]:
    """``make_policy`` keyword arguments from a router artifact: the calibrated prior means,
    their fitted precision and label variance, and the raw BT head (``bayesian-paper``)."""
    if router is None:
        return {}
    fit = getattr(router, "prior_fit", None)
    return {
        "prior_means": router.prior_means,
        "prior_precision": getattr(router, "prior_precision", None),
        "prior_sigma2": None if fit is None else np.asarray(fit.noise),
        "raw_prior_means": getattr(router, "bt_means", None),
    }


def reward_link(config: dict[str, Any], router: Any) -> RewardLink:
    """How a namespace's normalised rewards reach its posterior (``gateway.routing.prior``).

    Only ``bayesian`` maps −DPO loss through the link (centred on the accuracy its prior
    expects); ``bayesian-paper`` and the baselines learn from the normalised reward itself.
    """
    kind = config.get("reward") or ("correct" if config.get("normalizer") == "none" else "dpo")
    if kind == "dpo" and config.get("normalizer") == "none":
        raise ConfigError("reward", "'dpo' needs a normalizer (quantile or zscore), got 'none'")
    fit = getattr(router, "prior_fit", None)
    if kind == "dpo" and config.get("policy") == "bayesian":
        return RewardLink(
            "dpo",
            informativeness=float(config.get("dpo_informativeness") or 0.1),
            center=fit.stream_accuracy if fit is not None else 0.5,
            sigma2=fit.sigma2 if fit is not None else 0.25,
        )
    return RewardLink("correct")


@dataclass
class NsState:
    """One namespace as this replica holds it: its policy folded up to log position ``seq``."""

    meta: NamespaceMeta
    policy: Policy
    normalizer: Any
    forgetting: bool
    link: RewardLink = field(default_factory=RewardLink)
    seq: int = 0
    #: pairs routed and second opinions asked by this replica (the max_calls_per_pair budget)
    pairs_routed: int = 0
    second_opinions: int = 0
    obs_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    snapshot_seq: int = 0
    # The route id of the observation at ``seq``: each read overlaps it, so a log that went
    # backwards (a store restored from an older copy) is noticed even once it has grown again.
    last_route_id: str | None = None
    last_refresh: float = -math.inf
    inflight: asyncio.Future[NsState] | None = None
    inflight_started: float = -math.inf


@dataclass
class Timing:
    """Where one request's time went (seconds)."""

    total: float = 0.0
    rm_wait: float = 0.0
    encode: float = 0.0

    @property
    def overhead(self) -> float:
        return max(0.0, self.total - self.rm_wait)


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
        self._ns: dict[str, NsState] = {}
        self._ns_locks: dict[str, asyncio.Lock] = {}
        self.durability_warning: str | None = None
        self._startup_pending = set(settings.startup_namespaces)
        by_name = {r.name: r for r in settings.rms}
        self.needs_reference = np.array(
            [bool(by_name[n].needs_reference) if n in by_name else False for n in pool.names]
        )
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

    @classmethod
    def build(cls, settings: GatewaySettings) -> GatewayService:
        """Load the router artifact and encoder, connect the store, make the RM clients."""
        router: Router | None = None
        featurizer: Featurizer | None = None
        rm_order = [r.name for r in settings.rms]
        if settings.router_path is not None:
            import torch

            from gateway.offline.router import OfflineRouter

            torch.set_num_threads(settings.torch_threads)
            try:
                loaded = OfflineRouter.load(settings.router_path)
            except DataFormatError as exc:
                raise ConfigError(
                    "router_path",
                    f"{settings.router_path} is not a router artifact ({exc}); train one with "
                    "`reward-router router train ... --out DIR` (docs/offline-router.md)",
                ) from None
            missing = sorted(set(loaded.rms) - set(rm_order))
            extra = sorted(set(rm_order) - set(loaded.rms))
            if missing or extra:
                raise ConfigError(
                    "rms",
                    f"must name exactly the router's RMs {loaded.rms}; "
                    f"missing {missing}, not in the router {extra}",
                )
            rm_order = list(loaded.rms)
            featurizer = loaded.load_featurizer(
                settings.feature_cache_dir,
                device=settings.encoder_device,
                batch_size=settings.encoder_batch_size,
            )
            router = loaded
        by_name = {r.name: r for r in settings.rms}
        clients = [
            RMClient(
                name,
                by_name[name].url,
                connect_timeout_s=by_name[name].connect_timeout_s,
                read_timeout_s=by_name[name].read_timeout_s,
                max_batch=by_name[name].max_batch,
                api_key=(k.get_secret_value() if (k := by_name[name].api_key) else None),
                failure_threshold=settings.failure_threshold,
                cooldown_s=settings.cooldown_s,
            )
            for name in rm_order
        ]
        store: Store
        if settings.uses_redis:
            from gateway.store_redis import RedisStore

            store = RedisStore.from_settings(settings)
        elif settings.store_path is not None:
            from gateway.store_sqlite import SqliteStore

            store = SqliteStore(settings.store_path, synchronous=settings.store_synchronous)
        else:
            store = EmbeddedStore()
        metrics = GatewayMetrics(rm_order, settings.max_metric_namespaces)
        pool = RMPool(clients, settings.health_interval_s)
        return cls(settings, store, Contexts(router, featurizer), pool, metrics)

    async def start(self) -> None:
        await self.pool.start()
        self._update_rm_gauges()
        await self._check_durability()
        await self._create_startup_namespaces()

    async def _create_startup_namespaces(self) -> None:
        """Create ``startup_namespaces`` that are missing, once per process (retried from
        /readyz while the store is down). Never later: a namespace lost while this process runs
        stays 404 until someone creates it again, it does not come back from the defaults."""
        for ns in list(self._startup_pending):
            try:
                info = await self.create_namespace(ns, None)
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

    # ---- namespace config and state ----------------------------------------------------------

    def _policy_from(self, ns: str, config: dict[str, Any]) -> tuple[Policy, Any, bool, RewardLink]:
        from gateway.routing import make_policy

        name = config.get("policy")
        if not isinstance(name, str):
            raise ConfigError("policy", "must be a policy name")
        best = config.get("best_rm")
        best_idx = None
        if best is not None:
            if best not in self.rm_names:
                raise ConfigError("best_rm", f"must be one of {self.rm_names}, got {best!r}")
            best_idx = self.rm_names.index(best)
        seed = self.settings.seed
        rng = np.random.default_rng(None if seed is None else [seed, zlib.crc32(ns.encode())])
        params = dict(config.get("params") or {})
        # The router's fitted prior (means, precision, label variance) reaches the policy as
        # arguments; a namespace's own lambda0 / sigma2 in params override them.
        policy = make_policy(
            name,
            n_rms=self.n_rms,
            dim=self.contexts.dim,
            rng=rng,
            best_rm=best_idx,
            **prior_kwargs(self.contexts.router),
            **params,
        )
        if policy.requires_labels:
            raise ConfigError(
                "policy",
                f"{name!r} needs each pair's true label, which a live trainer does not have; "
                "use it in `reward-router replay` only",
            )
        normalizer = make_normalizer(
            str(config.get("normalizer", "quantile")), dict(config.get("normalizer_params") or {})
        )
        forgetting = float(params.get("forgetting", 1.0)) < 1.0
        return policy, normalizer, forgetting, reward_link(config, self.contexts.router)

    def _full_config(self, req: NamespaceConfig | None) -> dict[str, Any]:
        cfg = dict(self.default_config)
        if req is not None:
            given = req.model_dump(exclude_none=True)
            if "policy" in given and "params" not in given:
                cfg["params"] = {}  # the defaults' params belong to the defaults' policy
            cfg.update(given)
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
        policy, normalizer, forgetting, link = self._policy_from(meta.name, cfg)
        return NsState(
            meta,
            policy,
            normalizer,
            forgetting,
            link,
            obs_counts=np.zeros(self.n_rms, dtype=np.int64),
        )

    def _lock_for(self, ns: str) -> asyncio.Lock:
        lock = self._ns_locks.get(ns)
        if lock is None:
            lock = self._ns_locks[ns] = asyncio.Lock()
        return lock

    async def _state(self, ns: str, *, force_refresh: bool = False) -> NsState:
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
                    self._ns_locks.pop(ns, None)
        return await self._refresh(st, force=force_refresh)

    async def _refresh(self, st: NsState, *, force: bool) -> NsState:
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
            fits = self._matches(st, tail) if overlap else not tail or tail[0].seq == 1
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
            self._posterior_gauges(st)
        every = self.settings.snapshot_every
        if every and st.seq - st.snapshot_seq >= every and st.seq <= length:
            with contextlib.suppress(RewardRouterError):  # a snapshot is an optimisation
                await self._save_snapshot(st)
        return st

    @staticmethod
    def _matches(st: NsState, tail: list[Observation]) -> bool:
        """Whether the store's entry at ``st.seq`` (the first of ``tail``) is the one folded."""
        if not tail or tail[0].seq != st.seq:
            return False
        return st.last_route_id is None or tail[0].route_id == st.last_route_id

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
        """:meth:`_fold`, in a worker thread on a copy for a long tail (swapped in after), so
        the event loop keeps serving while a long log is rebuilt."""
        if len(tail) <= FOLD_INLINE:
            self._fold(st, tail)
            return
        work = copy.copy(st)
        work.policy = copy.deepcopy(st.policy)
        work.normalizer = copy.deepcopy(st.normalizer)
        work.obs_counts = st.obs_counts.copy()
        await asyncio.to_thread(self._fold, work, tail)
        st.policy, st.normalizer, st.obs_counts = work.policy, work.normalizer, work.obs_counts
        st.seq, st.last_route_id = work.seq, work.last_route_id

    def _posterior_gauges(self, st: NsState) -> tuple[list[float], list[float]] | None:
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

    @staticmethod
    def _snapshottable(st: NsState) -> bool:
        # Only the Bayesian family keeps all it learned in `.posteriors`; other learning
        # policies (laser) are rebuilt from the whole log.
        from gateway.routing import GaussianPosteriors

        return isinstance(getattr(st.policy, "posteriors", None), GaussianPosteriors)

    async def _save_snapshot(self, st: NsState) -> None:
        if not self._snapshottable(st):
            return
        arrays = dict(st.policy.posteriors.to_arrays())  # type: ignore[attr-defined]
        arrays["obs_counts"] = st.obs_counts.copy()
        norm = st.normalizer.state() if st.normalizer is not None else None
        head = json.dumps(
            {"seq": st.seq, "normalizer": norm, "last_route_id": st.last_route_id}
        ).encode()
        arrays["head"] = np.frombuffer(head, dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        # The store writes it only if its log still holds this entry at seq: a snapshot is
        # never ahead of the log it came from (the log may have gone backwards since the read).
        last_uid = st.last_route_id.rsplit(":", 1)[-1] if st.last_route_id else None
        stored = await self.store.put_snapshot(
            st.meta.name, st.meta.gen, st.seq, buf.getvalue(), last_uid=last_uid
        )
        st.snapshot_seq = st.seq
        keep = self.settings.log_keep
        if stored and keep is not None and st.seq > keep:
            await self.store.trim_log(st.meta.name, st.meta.gen, st.seq - keep)

    async def _load_snapshot(self, st: NsState, *, always: bool = False) -> None:
        """The store's snapshot into ``st``; ``always``: even with ``snapshot_every: 0`` (a
        rebuild behind a trimmed log head needs it)."""
        if not (self.settings.snapshot_every or always) or not self._snapshottable(st):
            return
        got = await self.store.get_snapshot(st.meta.name, st.meta.gen)
        if got is None:
            return
        from gateway.routing import GaussianPosteriors

        try:
            with np.load(io.BytesIO(got[1]), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            head = json.loads(arrays.pop("head").tobytes())
            counts = arrays.pop("obs_counts")
            posteriors = GaussianPosteriors.from_arrays(arrays)
            st.policy.posteriors = posteriors  # type: ignore[attr-defined]
            if st.normalizer is not None:
                st.normalizer = type(st.normalizer).from_state(head["normalizer"])
        except (ValueError, KeyError, TypeError, OSError) as exc:
            # Unreadable (another version, another policy config): the log is the truth.
            log.warning("ignoring snapshot of %s: %s", st.meta.name, exc)
            st.policy, st.normalizer, st.forgetting, st.link = self._policy_from(
                st.meta.name, st.meta.config
            )
            return
        st.obs_counts = counts.astype(np.int64)
        st.seq = st.snapshot_seq = int(head["seq"])
        st.last_route_id = head.get("last_route_id")

    def _fold(self, st: NsState, tail: list[Observation]) -> None:
        """Fold observations (in sequence order) into the normaliser and the policy."""
        if not tail:
            return
        if tail[0].seq != st.seq + 1:
            raise RuntimeError(f"log gap: have {st.seq}, got {tail[0].seq}")
        raw = np.array([o.reward for o in tail], dtype=np.float64)
        if st.normalizer is not None:
            # One at a time: each observation is normalised against the window of everything
            # before it in the log, whatever batches the replicas happened to read it in.
            rewards = np.array(
                [st.normalizer.normalize(raw[i : i + 1])[0] for i in range(len(raw))]
            )
        else:
            rewards = raw
        # Onto the posterior's scale (P(label right)); the link depends on the prior only, so
        # any replica folding the same log gets the same posterior.
        values, weight = st.link.map(rewards)
        arms = np.array([o.arm for o in tail], dtype=np.int64)
        h = np.stack([o.h for o in tail])
        if st.forgetting or not self._snapshottable(st):
            # Forgetting discounts per update call, and laser's update depends on how a batch
            # is split: per item, so the state never depends on how the log was read.
            for i in range(len(tail)):
                st.policy.update(h[i : i + 1], arms[i : i + 1], values[i : i + 1], weight)
        else:
            st.policy.update(h, arms, values, weight)
        st.obs_counts += np.bincount(arms, minlength=self.n_rms)
        st.seq = tail[-1].seq
        st.last_route_id = tail[-1].route_id

    # ---- namespaces (HTTP: /v1/namespaces) ----------------------------------------------------

    async def create_namespace(self, ns: str, req: NamespaceConfig | None) -> NamespaceInfo:
        self._check_ns(ns)
        config = self._full_config(req)
        self._policy_from(ns, config)  # validate before anything is stored
        meta, created = await self.store.create_namespace(
            ns, config, limit=self.settings.max_namespaces
        )
        if not created and meta.config != config:
            raise NamespaceConflict(
                f"namespace {ns!r} exists with another config {meta.config}; reset or delete it"
            )
        return NamespaceInfo(namespace=ns, created=created, config=meta.config)

    async def reset_namespace(self, ns: str) -> NamespaceInfo:
        self._check_ns(ns)
        meta = await self.store.reset_namespace(ns)
        if meta is None:
            raise UnknownNamespace(ns)
        self._ns.pop(ns, None)
        return NamespaceInfo(namespace=ns, created=False, config=meta.config)

    async def delete_namespace(self, ns: str) -> None:
        self._check_ns(ns)
        if not await self.store.delete_namespace(ns):
            raise UnknownNamespace(ns)
        self._ns.pop(ns, None)

    async def list_namespaces(self) -> list[str]:
        return await self.store.list_namespaces()

    @staticmethod
    def _check_ns(ns: str) -> None:
        if not NAMESPACE_RE.match(ns):
            raise InputError("namespace", f"must match {NAMESPACE_RE.pattern}, got {ns!r}")

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

    def _reference_last(self, ranking: np.ndarray, pairs: Sequence[Any]) -> np.ndarray:
        """Each draw's ranking with the RMs that need a reference moved last for pairs that have
        none: such an RM (a verifier) could only abstain, a tie that teaches the trainer nothing.
        The choice is then the best of the other RMs under the same draw."""
        if not self.needs_reference.any():
            return ranking
        out = ranking.copy()
        for i, pair in enumerate(pairs):
            if pair.reference:
                continue
            row = [int(a) for a in ranking[i]]
            out[i] = [a for a in row if not self.needs_reference[a]] + [
                a for a in row if self.needs_reference[a]
            ]
        return out

    def _order(self, row: np.ndarray, tried: set[int]) -> list[int]:
        """Untried RMs of one ranking: available ones first, then the rest as a last resort."""
        clients = self.pool.clients
        left = [int(a) for a in row if int(a) not in tried]
        return [a for a in left if clients[a].available()] + [
            a for a in left if not clients[a].available()
        ]

    async def _ask(
        self, arm: int, idx: list[int], payloads: list[dict[str, Any]]
    ) -> tuple[int, list[int], list[Comparison] | RMUnavailable]:
        client: RMClient = self.pool.clients[arm]
        t0 = time.perf_counter()
        try:
            res = await client.compare([payloads[i] for i in idx])
            self.metrics.rm_latency.labels(client.name, "ok").observe(time.perf_counter() - t0)
            return arm, idx, res
        except RMUnavailable as exc:
            self.metrics.rm_latency.labels(client.name, "error").observe(time.perf_counter() - t0)
            return arm, idx, exc
        except RMRejected:
            self.metrics.rm_latency.labels(client.name, "rejected").observe(
                time.perf_counter() - t0
            )
            raise

    def _first_round(
        self, ranking: np.ndarray, asked: np.ndarray, ensemble: bool
    ) -> list[list[int]]:
        """What each pair asks first: the policy's asked set (ensembles), or the first available
        RM of the draw's ranking (single-RM policies; skipping one counts as a fallback)."""
        out = []
        for i in range(ranking.shape[0]):
            if ensemble:
                out.append([int(a) for a in ranking[i] if asked[i, int(a)]])
                continue
            first = self._order(ranking[i], set())[:1]
            top = int(ranking[i, 0])
            if first and first[0] != top:
                self.metrics.fallbacks.labels(self.pool.clients[top].name, "cooldown").inc()
            out.append(first)
        return out

    async def _dispatch(
        self, payloads: list[dict[str, Any]], ranking: np.ndarray, first: list[list[int]]
    ) -> tuple[list[dict[int, Comparison]], float]:
        """Ask RMs until every pair has an answer; returns the answers per pair and RM wait."""
        b = len(payloads)
        answers: list[dict[int, Comparison]] = [{} for _ in range(b)]
        tried: list[set[int]] = [set() for _ in range(b)]
        targets: dict[int, list[int]] = {}
        for i in range(b):
            for a in first[i]:
                targets.setdefault(a, []).append(i)
        wait = 0.0
        while targets:
            t0 = time.perf_counter()
            calls = [self._ask(a, idx, payloads) for a, idx in targets.items()]
            done = await asyncio.gather(*calls)
            wait += time.perf_counter() - t0
            targets = {}
            for arm, idx, res in done:
                for i in idx:
                    tried[i].add(arm)
                if isinstance(res, RMUnavailable):
                    name = self.pool.clients[arm].name
                    log.warning("RM %s failed for %d pairs: %s", name, len(idx), res)
                    self.metrics.fallbacks.labels(name, "error").inc(len(idx))
                    continue
                for i, cmp in zip(idx, res, strict=True):
                    answers[i][arm] = cmp
            # Pairs left without any answer go to the next RM of their own ranking. An ensemble
            # pair with some answers keeps them (the failed RMs are left out of the combine).
            for i in sorted({i for _, idx, _ in done for i in idx}):
                if answers[i]:
                    continue
                nxt = self._order(ranking[i], tried[i])[:1]
                if not nxt:
                    raise AllRMsFailed(f"pair {i}: every RM failed ({', '.join(self.rm_names)})")
                targets.setdefault(nxt[0], []).append(i)
        return answers, wait

    async def route(self, req: RouteRequest) -> tuple[RouteResponse, Timing]:
        t_start = time.perf_counter()
        timing = Timing()
        self._check_sizes(req.pairs)
        # The log refresh (a store read) runs while the pairs are encoded.
        state_task = asyncio.ensure_future(self._state(req.namespace))
        t0 = time.perf_counter()
        try:
            h = await self.contexts(req.pairs)
        except BaseException:
            state_task.cancel()
            raise
        timing.encode = time.perf_counter() - t0
        self.metrics.encode.observe(timing.encode)
        st = await state_task
        selection = st.policy.select(h)
        ranking = self._reference_last(np.asarray(selection.ranking), req.pairs)
        ensemble = st.policy.calls_per_pair > 1
        first = self._first_round(ranking, np.asarray(selection.asked), ensemble)
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
        try:
            answers, timing.rm_wait = await self._dispatch(payloads, ranking, first)
            if not ensemble:
                timing.rm_wait += await self._second_opinions(
                    st, req.namespace, ranking, answers, payloads
                )
        except BaseException:
            with contextlib.suppress(BaseException):
                await write
            raise
        ids = await write

        results: list[RouteResult] = []
        margins = np.full((len(req.pairs), self.n_rms), np.nan)
        for i, ans in enumerate(answers):
            for arm, cmp in ans.items():
                margins[i, arm] = cmp.score_a - cmp.score_b
        combined = st.policy.combine(margins) if ensemble else None
        ns_label = self.metrics.ns_label(req.namespace)
        moved: list[int] = []
        arms: list[int] = []
        for i, ans in enumerate(answers):
            order = [int(a) for a in ranking[i] if int(a) in ans]
            # A second opinion replaces a tie; otherwise the first-ranked answer.
            arm = next((a for a in order if ans[a].preferred != "tie"), order[0])
            arms.append(arm)
            if arm != planned[i]:
                moved.append(i)
            names = [self.rm_names[a] for a in order]
            if ensemble and combined is not None:
                m = float(combined[i])
                preferred = "a" if m > 0 else "b" if m < 0 else "tie"
                score_a = float(np.mean([ans[a].score_a for a in order]))
                score_b = float(np.mean([ans[a].score_b for a in order]))
            else:
                c = ans[arm]
                preferred, score_a, score_b = c.preferred, c.score_a, c.score_b
            self.metrics.routes.labels(ns_label, self.rm_names[arm]).inc()
            results.append(
                RouteResult(
                    id=req.pairs[i].id,
                    route_id=ids[i],
                    rm=self.rm_names[arm],
                    rms=names if ensemble or len(order) > 1 else None,
                    preferred=preferred,  # type: ignore[arg-type]
                    score_a=score_a,
                    score_b=score_b,
                    fallback=(not ensemble) and order[0] != int(ranking[i, 0]),
                )
            )
        if moved:
            await self.store.put_routes(
                req.namespace,
                st.meta.gen,
                [(arms[i], h[i]) for i in moved],
                self.settings.route_ttl_s,
                uids=[uids[i] for i in moved],
                uncount=[planned[i] for i in moved],
            )
        timing.total = time.perf_counter() - t_start
        self._update_rm_gauges()
        return RouteResponse(namespace=req.namespace, results=results), timing

    async def _second_opinions(
        self,
        st: NsState,
        ns: str,
        ranking: np.ndarray,
        answers: list[dict[int, Comparison]],
        payloads: list[dict[str, Any]],
    ) -> float:
        """Ask the next RM of the same draw for pairs whose RM tied, while the namespace's
        ``max_calls_per_pair`` budget (this replica's count) lasts; returns the RM wait."""
        cap = float(st.meta.config.get("max_calls_per_pair") or 1.0)
        st.pairs_routed += len(answers)
        if cap <= 1.0 or self.n_rms < 2:
            return 0.0
        targets: dict[int, list[int]] = {}
        for i, ans in enumerate(answers):
            if len(ans) != 1 or next(iter(ans.values())).preferred != "tie":
                continue
            if st.second_opinions + 1 > (cap - 1.0) * st.pairs_routed:
                break
            nxt = [a for a in self._order(ranking[i], set(ans)) if self.pool.clients[a].available()]
            if nxt:
                st.second_opinions += 1
                targets.setdefault(nxt[0], []).append(i)
        if not targets:
            return 0.0
        t0 = time.perf_counter()
        done = await asyncio.gather(*(self._ask(a, idx, payloads) for a, idx in targets.items()))
        label = self.metrics.ns_label(ns)
        for arm, idx, res in done:
            self.metrics.second_opinions.labels(label).inc(len(idx))
            if isinstance(res, RMUnavailable):
                continue  # the first RM's tie stands
            for i, cmp in zip(idx, res, strict=True):
                answers[i][arm] = cmp
        return time.perf_counter() - t0

    # ---- feedback ------------------------------------------------------------------------------

    async def feedback(self, req: FeedbackRequest) -> FeedbackResponse:
        if len(req.feedback) > self.settings.max_feedback:
            raise InputError("feedback", f"at most {self.settings.max_feedback} items per request")
        items = [(f.route_id, f.reward) for f in req.feedback]
        results = await self.store.apply_feedback(items)
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
            st = self._ns.get(ns)
            if st is not None:
                # Applied and durable already; a failed refresh only delays this replica's view.
                with contextlib.suppress(RewardRouterError):
                    await self._refresh(st, force=True)
        return FeedbackResponse(
            applied=counts[Outcome.APPLIED],
            duplicate=counts[Outcome.DUPLICATE],
            unknown=counts[Outcome.UNKNOWN],
        )

    # ---- posteriors ----------------------------------------------------------------------------

    async def posteriors(self, ns: str, *, full: bool = False) -> PosteriorsResponse:
        self._check_ns(ns)
        st = await self._state(ns, force_refresh=True)
        routes = await self.store.route_counts(ns, st.meta.gen)
        summary = self._posterior_gauges(st)
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
