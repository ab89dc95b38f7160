"""The gateway's state store: namespaces, route records and the observation log.

Three backends with one contract (one test suite runs against all three):

* :class:`gateway.store_memory.EmbeddedStore` — in process and memory only, for tests and
  throw-away runs;
* :class:`gateway.store_sqlite.SqliteStore` — one SQLite file, for a single replica that must
  survive a restart (``store_path``);
* :class:`gateway.store_redis.RedisStore` — shared by any number of replicas.

The contract:

* a namespace has a config (policy + normaliser, JSON) and a generation token ``gen``; a reset
  draws a new ``gen``, which orphans every route record and the log of the old one;
* a route record (``route_id = "ns:gen:uid"`` -> RM index, context h) lives ``ttl_s`` seconds;
* :meth:`Store.apply_feedback` is atomic per item: the record is checked and marked applied and
  the observation (RM, h, raw reward) is appended to the namespace's log, in one step, so a
  feedback is applied exactly once; a repeat is ``DUPLICATE``; a missing, expired, malformed or
  old-generation id is ``UNKNOWN``;
* the log is append-only; an observation's sequence number is its 1-based position, so a replica
  that folded ``seq <= k`` reads only the tail ``seq > k`` (at most ``limit`` of it per call:
  chunked reads), and learns the log's length with it: a length below ``k`` means the log went
  backwards (a store restored from an older copy);
* :meth:`Store.trim_log` drops the entries ``seq <= upto`` from the log's head (compaction,
  after a snapshot at or past ``upto``); sequence numbers do not change, a read from before the
  trimmed head starts at its first entry left;
* at most ``limit`` namespaces exist when ``create_namespace`` is given one
  (:class:`NamespaceLimit` past it), checked in the same atomic step as the creation.

Two kinds of entry share the log, told apart by the record's uid: a trainer's feedback (the
route's own uid: 32 hex digits) and a gold audit (the route's uid + :data:`AUDIT_SUFFIX`, a
record of its own that the gateway writes and applies through the same exactly-once step;
``Observation.audit``). Logs written before audits hold feedback entries only and read as such;
the entry format and the stores' scripts are the same for both kinds.

Raw rewards go into the log, not normalised ones: every replica folds the log in sequence order
through the same deterministic normaliser, so all replicas (and a restarted one) reach the same
normaliser state and the same posterior. Normalising at feedback time would need the window in
the store and a per-item script round trip for it, for no gain.

>>> import asyncio, numpy as np
>>> from gateway.store_memory import EmbeddedStore
>>> async def demo():
...     st = EmbeddedStore()
...     meta, _ = await st.create_namespace("run", {"policy": "bayesian"})
...     rid = (await st.put_routes("run", meta.gen, [(0, np.ones(2))], ttl_s=60))[0]
...     first = await st.apply_feedback([(rid, 0.5), (rid, 0.5), ("nope", 1.0)])
...     _, log, _ = await st.read_tail("run", meta.gen, 0)
...     return [o.outcome.value for o in first], [(o.seq, o.arm, o.reward) for o in log]
>>> asyncio.run(demo())
(['applied', 'duplicate', 'unknown'], [(1, 0, 0.5)])
"""

from __future__ import annotations

import enum
import secrets
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from gateway.settings import NAMESPACE_RE
from reward_router.errors import RewardRouterError

_REC_HEAD = struct.Struct("<HH")  # arm, D
_REWARD = struct.Struct("<d")

#: A gold audit's record uid is its route's uid + this (not a hex digit, so no route's uid ends
#: with it): the audit gets its own exactly-once record, and its log entry says it is an audit.
AUDIT_SUFFIX = "audit"


MEMORY_ONLY = (
    "state is memory-only (embedded store without store_path): every namespace, posterior and "
    "route id is lost when this gateway stops; set store_path (SQLite file) or REDIS_URL"
)


class StoreUnavailable(RewardRouterError):
    """The store could not be reached (after the configured retries); maps to HTTP 503."""


class NamespaceLimit(RewardRouterError):
    """The store holds ``max_namespaces`` namespaces already (HTTP 409)."""


class Outcome(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class FeedbackResult:
    """What happened to one feedback item; ``seq`` and ``arm`` (the RM) are set when applied."""

    outcome: Outcome
    namespace: str | None = None
    seq: int | None = None
    arm: int | None = None


@dataclass(frozen=True)
class NamespaceMeta:
    name: str
    gen: str
    config: dict[str, Any]
    created: float


@dataclass(frozen=True)
class Observation:
    """One applied feedback, as stored in the log: the reward is the trainer's raw value."""

    seq: int
    arm: int
    h: np.ndarray = field(repr=False)
    reward: float
    route_id: str
    #: a gold audit's agreement (on the correctness scale), not the trainer's reward
    audit: bool = False


@dataclass(frozen=True)
class RouteId:
    ns: str
    gen: str
    uid: str

    def __str__(self) -> str:
        return f"{self.ns}:{self.gen}:{self.uid}"

    @staticmethod
    def parse(text: str) -> RouteId | None:
        """``"ns:gen:uid"`` -> RouteId; anything else -> None (reported as unknown)."""
        parts = text.split(":")
        if len(parts) != 3 or not NAMESPACE_RE.match(parts[0]):
            return None
        ns, gen, uid = parts
        if not (gen.isalnum() and uid.isalnum() and len(gen) <= 32 and len(uid) <= 64):
            return None
        return RouteId(ns, gen, uid)


def new_gen() -> str:
    return secrets.token_hex(4)


def new_uid() -> str:
    return uuid.uuid4().hex


def audit_uid(uid: str) -> str:
    """The uid of the gold audit of route ``uid`` (:data:`AUDIT_SUFFIX`)."""
    return uid + AUDIT_SUFFIX


def is_audit_uid(uid: str) -> bool:
    """Whether ``uid`` is a gold audit's (:func:`audit_uid`), not a route's."""
    return uid.endswith(AUDIT_SUFFIX)


def route_uids(records: Sequence[Any], uids: Sequence[str] | None) -> list[str]:
    """``put_routes``' uids: the given ones (a rewrite keeps its id), else new ones."""
    given = list(uids) if uids is not None else [new_uid() for _ in records]
    if len(given) != len(records):
        raise ValueError("uids and records differ in length")
    return given


def encode_record(arm: int, h: np.ndarray, uid: str) -> bytes:
    """A route record: RM index, D, h as little-endian float64, the uid (for the log's audit)."""
    h64 = np.ascontiguousarray(h, dtype="<f8").ravel()
    return _REC_HEAD.pack(arm, h64.size) + h64.tobytes() + uid.encode()


def count_deltas(
    records: Sequence[tuple[int, np.ndarray]], uncount: Sequence[int]
) -> dict[int, int]:
    """Per RM: routes written minus the rewritten records' old RMs (``put_routes``' counters)."""
    counts: dict[int, int] = {}
    for arm, _ in records:
        counts[arm] = counts.get(arm, 0) + 1
    for arm in uncount:
        counts[arm] = counts.get(arm, 0) - 1
    return {arm: c for arm, c in counts.items() if c}


def record_arm(record: bytes) -> int:
    """The RM index of a route record (:func:`encode_record`)."""
    arm, _ = _REC_HEAD.unpack_from(record, 0)
    return int(arm)


def encode_reward(reward: float) -> bytes:
    return _REWARD.pack(float(reward))


def decode_entry(seq: int, entry: bytes, ns: str, gen: str) -> Observation:
    """A log entry is ``reward(8) + record``; see :func:`encode_record`."""
    (reward,) = _REWARD.unpack_from(entry, 0)
    arm, dim = _REC_HEAD.unpack_from(entry, 8)
    start = 8 + _REC_HEAD.size
    h = np.frombuffer(entry, dtype="<f8", count=dim, offset=start).astype(np.float64)
    uid = entry[start + 8 * dim :].decode()
    rid = f"{ns}:{gen}:{uid}"
    return Observation(seq, arm, h, reward, rid, audit=is_audit_uid(uid))


class Store(Protocol):
    """What the gateway needs from a store; both backends implement it with equal semantics."""

    async def ping(self) -> None: ...

    async def durability_warning(self) -> str | None:
        """Why acknowledged state could be lost on a restart (memory only, Redis without AOF),
        or None when every acknowledged write is on disk."""
        ...

    async def get_namespace(self, ns: str) -> NamespaceMeta | None: ...

    async def create_namespace(
        self, ns: str, config: dict[str, Any], *, limit: int | None = None
    ) -> tuple[NamespaceMeta, bool]:
        """Create ``ns`` unless it exists (then its meta and False); raises
        :class:`NamespaceLimit` when ``limit`` namespaces exist already."""
        ...

    async def reset_namespace(self, ns: str) -> NamespaceMeta | None: ...

    async def delete_namespace(self, ns: str) -> bool: ...

    async def list_namespaces(self) -> list[str]: ...

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
        """Write route records (new uids unless given: a rewrite keeps the id) and count them
        per RM; ``uncount`` takes back the counts of rewritten records' old RMs."""
        ...

    async def apply_feedback(self, items: Sequence[tuple[str, float]]) -> list[FeedbackResult]: ...

    async def read_tail(
        self, ns: str, gen: str, after_seq: int, limit: int | None = None
    ) -> tuple[NamespaceMeta | None, list[Observation], int]:
        """The namespace's meta, the observations ``after_seq < seq <= after_seq + limit`` of
        generation ``gen`` and the log's length, read at one instant (no log: ``[]``, 0)."""
        ...

    async def route_counts(self, ns: str, gen: str) -> dict[int, int]: ...

    async def trim_log(self, ns: str, gen: str, upto: int) -> int:
        """Drop the log's entries ``seq <= upto`` (never past its end); the new head's base."""
        ...

    async def get_snapshot(self, ns: str, gen: str) -> tuple[int, bytes] | None:
        """The newest snapshot ``(seq, blob)`` of a namespace generation, if any."""
        ...

    async def put_snapshot(
        self, ns: str, gen: str, seq: int, blob: bytes, *, last_uid: str | None = None
    ) -> bool:
        """Store a snapshot unless one at ``seq`` or later is there already, or (with
        ``last_uid``) the log's entry at ``seq`` is missing or is not that route's: a snapshot
        is never written ahead of the log (one that went backwards since it was read)."""
        ...

    async def get_sticky(self, ns: str, gen: str, keys: Sequence[str]) -> dict[str, bytes]:
        """The sticky values of ``keys`` that are set (and not expired)."""
        ...

    async def claim_sticky(self, ns: str, gen: str, key: str, value: bytes, ttl_s: float) -> bytes:
        """Set ``key`` to ``value`` unless it is set: atomically, for every replica. Returns
        what the key holds now (``value`` if this call set it, else the earlier claim's)."""
        ...

    async def aclose(self) -> None: ...
