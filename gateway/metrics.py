"""The gateway's Prometheus metrics, all in one place: ``reward_router_gateway_*``, base units.

Each app gets its own ``CollectorRegistry`` (so two apps in one test process do not clash); one
gateway process is one uvicorn worker, and replicas are separate processes, each scraped on its
own ``/metrics``, so no multiprocess mode is needed.

Labels are bounded: ``rm`` is one of the configured RMs; ``namespace`` is the first
``max_namespaces`` namespaces seen by this process, the rest share ``"_other"``; outcomes and
reasons are fixed sets.

>>> m = GatewayMetrics(rm_names=["a", "b"], max_namespaces=1)
>>> m.ns_label("run-1"), m.ns_label("run-2")
('run-1', '_other')
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
# −DPO loss is <= 0; most mass sits in [-2, 0] (log 2 ~ 0.69 at the start of training).
_REWARD_BUCKETS = (-10, -5, -3, -2, -1.5, -1, -0.75, -0.5, -0.25, -0.1, 0, 0.5, 1, 5)


class GatewayMetrics:
    """The metric objects plus the bounded-label helper; see the module docstring."""

    def __init__(self, rm_names: Sequence[str], max_namespaces: int = 32) -> None:
        self.registry = CollectorRegistry()
        self.max_namespaces = max_namespaces
        self._namespaces: set[str] = set()
        r = self.registry
        p = "reward_router_gateway_"
        self.routes = Counter(
            p + "routes",
            "Pairs answered, by the RM that answered.",
            ["namespace", "rm"],
            registry=r,
        )
        self.fallbacks = Counter(
            p + "fallbacks",
            "Pairs moved off an RM to the next-best of the same draw.",
            ["rm", "reason"],
            registry=r,
        )
        self.second_opinions = Counter(
            p + "second_opinions",
            "Pairs asked of a second RM because the first tied (max_calls_per_pair > 1).",
            ["namespace"],
            registry=r,
        )
        self.audit_calls = Counter(
            p + "audit_calls",
            "Pairs also sent to a namespace's audit RM (gold audits), by the call's outcome.",
            ["namespace", "outcome"],
            registry=r,
        )
        self.audits = Counter(
            p + "audits",
            "Gold audits recorded, by the routed RM and its label's agreement with the auditor.",
            ["namespace", "rm", "result"],
            registry=r,
        )
        self.audit_skips = Counter(
            p + "audit_skips",
            "Pairs drawn for a gold audit that recorded none, by reason.",
            ["namespace", "reason"],
            registry=r,
        )
        self.rm_latency = Histogram(
            p + "rm_request_duration_seconds",
            "Time of one /v1/compare call to an RM.",
            ["rm", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.feedback = Counter(
            p + "feedback", "Feedback items by outcome.", ["outcome"], registry=r
        )
        self.reward = Histogram(
            p + "reward_raw",
            "The trainer's raw reward (−DPO loss) of applied feedback, by the RM that was asked.",
            ["namespace", "rm"],
            buckets=_REWARD_BUCKETS,
            registry=r,
        )
        self.posterior_mean_norm = Gauge(
            p + "posterior_mean_norm",
            "L2 norm of the posterior mean of an RM's weights.",
            ["namespace", "rm"],
            registry=r,
        )
        self.posterior_uncertainty = Gauge(
            p + "posterior_uncertainty",
            "sqrt(mean diagonal of the posterior covariance) of an RM.",
            ["namespace", "rm"],
            registry=r,
        )
        self.overhead = Histogram(
            p + "overhead_seconds",
            "Time in the gateway per request, excluding the wait for RMs.",
            ["endpoint"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.route_store_wait = Histogram(
            p + "route_store_wait_seconds",
            "Time a route request waited for the store (its namespace state read, its route "
            "records written), after its own work; part of overhead_seconds{endpoint=route}.",
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.encode = Histogram(
            p + "encode_seconds",
            "Time computing pair features (encoder + router MLP) per route request.",
            buckets=(*_OVERHEAD_BUCKETS, 1, 2.5, 5),
            registry=r,
        )
        self.rm_available = Gauge(
            p + "rm_available", "1 if the RM is healthy and not cooling down.", ["rm"], registry=r
        )
        self.store_errors = Counter(
            p + "store_errors", "Requests failed because the store was unreachable.", registry=r
        )
        self.store_durable = Gauge(
            p + "store_durable",
            "1 if every acknowledged write is on disk; 0 if state is memory-only or Redis runs "
            "without AOF (see /readyz's warning).",
            registry=r,
        )
        self.overloaded = Counter(
            p + "overloaded",
            "Requests answered 503 + Retry-After because max_in_flight were being served.",
            registry=r,
        )
        self.cancelled = Counter(
            p + "cancelled",
            "Requests whose client went away before the answer; their work was cancelled.",
            registry=r,
        )
        self.rebuilds = Counter(
            p + "rebuilds",
            "Namespace states rebuilt from the store's log because it did not hold what this "
            "replica had folded (the log went backwards, or a snapshot was ahead of it).",
            registry=r,
        )
        for rm in rm_names:
            self.rm_available.labels(rm).set(1)

    def ns_label(self, ns: str) -> str:
        """``ns`` itself for the first ``max_namespaces`` namespaces seen, else ``"_other"``."""
        if ns in self._namespaces:
            return ns
        if len(self._namespaces) < self.max_namespaces:
            self._namespaces.add(ns)
            return ns
        return "_other"

    def render(self) -> bytes:
        return generate_latest(self.registry)
