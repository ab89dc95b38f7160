"""The in-memory store (``EmbeddedStore``): the store contract of :mod:`gateway.store` in one
process, for tests, throw-away runs and a single replica that may lose its state.

Every method runs to completion without awaiting, so on one event loop each is atomic, just as
the Redis scripts are.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.keys import APPLIED
from gateway.store import (
    MEMORY_ONLY,
    FeedbackResult,
    NamespaceLimit,
    NamespaceMeta,
    Observation,
    Outcome,
    RouteId,
    count_deltas,
    decode_entry,
    encode_record,
    encode_reward,
    new_gen,
    record_arm,
    route_uids,
)


@dataclass
class _EmbeddedNs:
    meta: NamespaceMeta
    log: list[bytes] = field(default_factory=list)
    base: int = 0  # entries trimmed off the head: log[i] has seq base + i + 1
    routes: dict[int, int] = field(default_factory=dict)
    snapshot: tuple[int, bytes] | None = None


class EmbeddedStore:
    """The in-memory store: same contract as Redis, one replica, state lost with the process
    (the gateway says so loudly: a log line at start-up, ``/readyz``'s body, a metric).

    Every method runs to completion without awaiting, so on one event loop each is atomic,
    just as the Redis scripts are.
    """

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._ns: dict[str, _EmbeddedNs] = {}
        # route key -> (expiry time, record bytes or APPLIED)
        self._routes: dict[tuple[str, str, str], tuple[float, bytes]] = {}
        self._puts = 0
        #: (ns, gen, key) -> (expires, value): OpenRLHF's sticky routes per prompt
        self._sticky: dict[tuple[str, str, str], tuple[float, bytes]] = {}
        self._claims = 0

    async def ping(self) -> None:
        return None

    async def durability_warning(self) -> str | None:
        return MEMORY_ONLY

    async def get_namespace(self, ns: str) -> NamespaceMeta | None:
        st = self._ns.get(ns)
        return st.meta if st else None

    async def create_namespace(
        self, ns: str, config: dict[str, Any], *, limit: int | None = None
    ) -> tuple[NamespaceMeta, bool]:
        st = self._ns.get(ns)
        if st is not None:
            return st.meta, False
        if limit is not None and len(self._ns) >= limit:
            raise NamespaceLimit(f"{len(self._ns)} namespaces exist (max_namespaces {limit})")
        meta = NamespaceMeta(ns, new_gen(), dict(config), self._clock())
        self._ns[ns] = _EmbeddedNs(meta)
        return meta, True

    async def reset_namespace(self, ns: str) -> NamespaceMeta | None:
        st = self._ns.get(ns)
        if st is None:
            return None
        meta = NamespaceMeta(ns, new_gen(), st.meta.config, st.meta.created)
        self._ns[ns] = _EmbeddedNs(meta)
        return meta

    async def delete_namespace(self, ns: str) -> bool:
        return self._ns.pop(ns, None) is not None

    async def list_namespaces(self) -> list[str]:
        return sorted(self._ns)

    def _sweep(self, now: float) -> None:
        # Expired records are dropped lazily, amortised over puts, so memory stays bounded.
        dead = [k for k, (exp, _) in self._routes.items() if exp <= now]
        for k in dead:
            del self._routes[k]

    async def put_routes(
        self,
        ns: str,
        gen: str,
        records: Sequence[tuple[int, np.ndarray]],
        ttl_s: float,
        *,
        uids: Sequence[str] | None = None,
        uncount: Sequence[int] = (),
    ) -> list[str]:
        now = self._clock()
        self._puts += 1
        if self._puts % 1024 == 0:
            self._sweep(now)
        ids = []
        st = self._ns.get(ns)
        counting = st is not None and st.meta.gen == gen
        for (arm, h), uid in zip(records, route_uids(records, uids), strict=True):
            self._routes[(ns, gen, uid)] = (now + ttl_s, encode_record(arm, h, uid))
            ids.append(f"{ns}:{gen}:{uid}")
        if st is not None and counting:
            for arm, c in count_deltas(records, uncount).items():
                st.routes[arm] = st.routes.get(arm, 0) + c
        return ids

    async def apply_feedback(self, items: Sequence[tuple[str, float]]) -> list[FeedbackResult]:
        now = self._clock()
        out = []
        for text, reward in items:
            rid = RouteId.parse(text)
            if rid is None:
                out.append(FeedbackResult(Outcome.UNKNOWN))
                continue
            key = (rid.ns, rid.gen, rid.uid)
            got = self._routes.get(key)
            st = self._ns.get(rid.ns)
            if got is None or got[0] <= now or st is None or st.meta.gen != rid.gen:
                out.append(FeedbackResult(Outcome.UNKNOWN))
                continue
            if got[1] == APPLIED:
                out.append(FeedbackResult(Outcome.DUPLICATE, rid.ns))
                continue
            st.log.append(encode_reward(reward) + got[1])
            self._routes[key] = (got[0], APPLIED)
            arm = record_arm(got[1])
            out.append(FeedbackResult(Outcome.APPLIED, rid.ns, st.base + len(st.log), arm))
        return out

    async def read_tail(
        self, ns: str, gen: str, after_seq: int, limit: int | None = None
    ) -> tuple[NamespaceMeta | None, list[Observation], int]:
        st = self._ns.get(ns)
        if st is None:
            return None, [], 0
        if st.meta.gen != gen:
            return st.meta, [], 0
        start = max(after_seq, st.base)
        end = None if limit is None else start + limit
        tail = st.log[start - st.base : None if end is None else end - st.base]
        obs = [decode_entry(start + i + 1, e, ns, gen) for i, e in enumerate(tail)]
        return st.meta, obs, st.base + len(st.log)

    async def trim_log(self, ns: str, gen: str, upto: int) -> int:
        st = self._ns.get(ns)
        if st is None or st.meta.gen != gen:
            return 0
        upto = min(upto, st.base + len(st.log))
        if upto > st.base:
            del st.log[: upto - st.base]
            st.base = upto
        return st.base

    async def route_counts(self, ns: str, gen: str) -> dict[int, int]:
        st = self._ns.get(ns)
        if st is None or st.meta.gen != gen:
            return {}
        return dict(st.routes)

    async def get_snapshot(self, ns: str, gen: str) -> tuple[int, bytes] | None:
        st = self._ns.get(ns)
        if st is None or st.meta.gen != gen:
            return None
        return st.snapshot

    async def put_snapshot(
        self, ns: str, gen: str, seq: int, blob: bytes, *, last_uid: str | None = None
    ) -> bool:
        st = self._ns.get(ns)
        if st is None or st.meta.gen != gen or (st.snapshot and st.snapshot[0] >= seq):
            return False
        if last_uid is not None and not (
            st.base < seq <= st.base + len(st.log)
            and st.log[seq - 1 - st.base].endswith(last_uid.encode())
        ):
            return False
        st.snapshot = (seq, blob)
        return True

    async def get_sticky(self, ns: str, gen: str, keys: Sequence[str]) -> dict[str, bytes]:
        now = self._clock()
        out = {}
        for k in keys:
            hit = self._sticky.get((ns, gen, k))
            if hit is not None and hit[0] > now:
                out[k] = hit[1]
        return out

    async def claim_sticky(self, ns: str, gen: str, key: str, value: bytes, ttl_s: float) -> bytes:
        now = self._clock()
        self._claims += 1
        if self._claims % 1024 == 0:  # expired claims dropped lazily, as route records are
            for k in [k for k, (exp, _) in self._sticky.items() if exp <= now]:
                del self._sticky[k]
        hit = self._sticky.get((ns, gen, key))
        if hit is not None and hit[0] > now:
            return hit[1]
        self._sticky[(ns, gen, key)] = (now + ttl_s, value)
        return value

    async def aclose(self) -> None:
        return None
