"""Prometheus metrics of one scoring service (one registry per app, so tests can run several).

Names are prefixed ``reward_router_rm_``, durations in seconds, labels bounded: ``rm`` (one per
process), ``endpoint`` (the route template, or ``other``), ``status`` (the HTTP code) and
``type`` (an error type of :mod:`services.errors`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Up to ten minutes: a 70B RM on a long batch is slow, and a request stuck near the timeout
# must still land in a finite bucket.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServiceMetrics:
    """All metrics of one service, registered in their own registry."""

    def __init__(self, rm: str) -> None:
        self.rm = rm
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "reward_router_rm_requests",
            "HTTP requests answered",
            ["rm", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "reward_router_rm_request_duration_seconds",
            "Request latency",
            ["rm", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter(
            "reward_router_rm_items",
            "Items (score) or pairs (compare) received",
            ["rm", "endpoint"],
            registry=r,
        )
        self.batch_size = Histogram(
            "reward_router_rm_batch_size",
            "Sequences per forward pass",
            ["rm"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.forward = Histogram(
            "reward_router_rm_forward_duration_seconds",
            "Duration of one forward pass",
            ["rm"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "reward_router_rm_errors", "Errors answered, by type", ["rm", "type"], registry=r
        )
        self.truncated = Counter(
            "reward_router_rm_truncated_items", "Items cut to max_length", ["rm"], registry=r
        )
        self.queue = Gauge(
            "reward_router_rm_queue_items", "Items waiting for a forward pass", ["rm"], registry=r
        )
        self.cancelled = Counter(
            "reward_router_rm_cancelled",
            "Requests whose client went away before the answer; their queued items were dropped",
            ["rm"],
            registry=r,
        )
        self.ready = Gauge(
            "reward_router_rm_ready", "1 once the model is loaded", ["rm"], registry=r
        )
