"""The Redis backend of the store: what lets several gateway replicas share a namespace.

Every read-modify-write is one Lua script (atomic on the server), registered once with its
KEYS/ARGV header; reads of several keys go in one pipeline. Keys: :mod:`gateway.keys`.

Topologies (:meth:`RedisStore.from_settings`): one server by URL, a master found through Redis
Sentinel, or a Redis Cluster. Every script and transaction touches the keys of one namespace
only, which share the namespace's hash tag, so on a cluster each runs in one slot; the set of
namespace names is its own slot and is written by a separate step (see ``create_namespace``).

Connections: one pool per store, at most ``pool_size`` connections; a burst past it waits up to
``pool_timeout_s`` for a free one instead of failing (redis-py's default pool raises "Too many
connections" at once). A cluster client keeps a pool per node without a wait, so there a
semaphore of ``pool_size`` store calls gives the same queueing.

Route records: the ``put_routes`` calls of one event-loop turn (concurrent ``/v1/route``
requests) are written in one pipeline, at most ``route_batch`` records per pipeline, with one
HINCRBY per (namespace, RM) for the whole batch; each caller waits for its own batch and gets
its route ids once the batch was acknowledged. A batch fails as a whole: every caller in it gets
a :class:`StoreUnavailable` of its own (what a write of its own would have raised, after the
same reconnect retries), so no route is reported stored from a failed batch (records it did
write are named by no answer and expire).

Durability: the gateway answers 200 on ``/v1/feedback`` only after the script returned, so with
``appendonly yes`` + ``appendfsync always`` an acknowledged feedback is on disk before the trainer
hears of it. Reconnects: redis-py retries connection errors with exponential back-off (a restart
of redis-server takes about a second). Retrying the feedback script is safe: if the first try was
applied and only its reply got lost, the retry finds the record marked and reports "duplicate";
the observation is in the log once either way.

>>> store = RedisStore.from_url("redis://127.0.0.1:6390/0")     # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import NoPermissionError, RedisError

from gateway import redis_scripts
from gateway.keys import Keys
from gateway.redis_clients import cluster_client, sentinel_client, url_client
from gateway.store import (
    FeedbackResult,
    NamespaceLimit,
    NamespaceMeta,
    Observation,
    Outcome,
    RouteId,
    StoreUnavailable,
    count_deltas,
    decode_entry,
    encode_record,
    encode_reward,
    new_gen,
    route_uids,
)

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings

T = TypeVar("T")

# Creating a namespace is two scripts, because its meta and the set of names live in different
# slots on a cluster: first the name is registered in the set (the limit is checked there, in
# the same atomic step), then the meta is created if missing. A crash between the two leaves a
# name without meta: not listed (list_namespaces shows names with meta), and the next create or
# delete of that name completes or removes it.


def _meta(ns: str, gen: Any, config: Any, created: Any) -> NamespaceMeta:
    def s(x: Any) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)

    return NamespaceMeta(ns, s(gen), json.loads(s(config)), float(s(created)))


@dataclass
class _RouteWrite:
    """One ``put_routes`` call's commands: its records' SETs and its counters' deltas."""

    sets: list[tuple[str, bytes]]  # route key, record
    counts: dict[tuple[str, int], int]  # (counter hash key, RM) -> delta
    ttl_ms: int


def _for_each_caller(exc: Exception) -> Exception:
    """The error a waiting caller of a failed batch gets: a store error of its own (one
    exception object raised in several tasks would collect all their tracebacks)."""
    if isinstance(exc, StoreUnavailable):
        own = StoreUnavailable(*exc.args)
        own.__cause__ = exc.__cause__
        return own
    return exc


class _TurnBatcher:
    """Route writes made in one event-loop turn (concurrent ``/v1/route`` requests), sent as
    one pipeline per batch of at most ``max_records`` records.

    Each caller awaits its own future: it returns once the batch holding its records was
    acknowledged, and raises the batch's error (a :class:`StoreUnavailable` of its own) if the
    batch failed, so no caller hears "stored" of a batch that failed. A caller gone before its
    batch is sent (a cancelled request) has its records left out.
    """

    def __init__(
        self, send: Callable[[Sequence[_RouteWrite]], Awaitable[None]], max_records: int
    ) -> None:
        self._send = send
        self.max_records = max_records
        self._pending: list[tuple[_RouteWrite, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def write(self, job: _RouteWrite) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((job, fut))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
            self._tasks.add(self._flusher)
            self._flusher.add_done_callback(self._tasks.discard)
        await fut

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # one loop turn: let the other writers of this moment join
        finally:  # (cancelled only with its loop, whose callers go with it)
            jobs, self._pending, self._flusher = self._pending, [], None
        batches: list[list[tuple[_RouteWrite, asyncio.Future[None]]]] = []
        held = 0
        for job in jobs:
            size = len(job[0].sets)
            if not batches or held + size > self.max_records:
                batches.append([])  # a call of more than max_records makes a batch of its own
                held = 0
            batches[-1].append(job)
            held += size
        await asyncio.gather(*(self._write(b) for b in batches))

    async def _write(self, batch: list[tuple[_RouteWrite, asyncio.Future[None]]]) -> None:
        batch = [(job, fut) for job, fut in batch if not fut.done()]
        if not batch:
            return
        try:
            await self._send([job for job, _ in batch])
        except BaseException as exc:
            failed = exc if isinstance(exc, Exception) else StoreUnavailable("redis: closing")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(_for_each_caller(failed))
            if not isinstance(exc, Exception):
                raise
            return
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    async def drain(self) -> None:
        """Wait for every batch in flight (before the client closes)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class RedisStore:
    """Store on Redis (one server, Sentinel or Cluster); see :mod:`gateway.store` for the contract.

    ``gate``: at most this many store calls at once (queueing the rest up to ``gate_timeout_s``);
    used with a cluster client, whose per-node pools fail instead of waiting. ``sentinel``: the
    manager a Sentinel client came from (its connections to the Sentinels close with the store).
    """

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        prefix: str = "rr",
        *,
        gate: int | None = None,
        gate_timeout_s: float = 10.0,
        sentinel: Sentinel | None = None,
        route_batch: int = 256,
    ) -> None:
        self._r: Any = client
        self._sentinel = sentinel
        self._cluster = isinstance(client, RedisCluster)
        self.keys = Keys(prefix)
        self._gate = asyncio.Semaphore(gate) if gate else None
        self._gate_size = gate
        self._gate_timeout_s = gate_timeout_s
        self._register = client.register_script(redis_scripts.REGISTER)
        self._create = client.register_script(redis_scripts.CREATE)
        self._reset = client.register_script(redis_scripts.RESET)
        self._feedback = client.register_script(redis_scripts.FEEDBACK)
        self._snapshot = client.register_script(redis_scripts.SNAPSHOT)
        self._trim = client.register_script(redis_scripts.TRIM)
        self._tail = client.register_script(redis_scripts.TAIL)
        self._route_writes = _TurnBatcher(self._write_routes, route_batch)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "rr",
        retries: int = 8,
        timeout_s: float = 5.0,
        pool_size: int = 128,
        pool_timeout_s: float = 10.0,
    ) -> RedisStore:
        """One server: reconnects (``retries`` tries, back-off 50 ms doubling to 1 s) and a
        blocking pool of ``pool_size`` connections (a call waits ``pool_timeout_s`` for one)."""
        client = url_client(
            url, retries=retries, timeout_s=timeout_s, pool_size=pool_size,
            pool_timeout_s=pool_timeout_s,
        )  # fmt: skip
        return cls(client, prefix)

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        master: str,
        *,
        prefix: str = "rr",
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        sentinel_username: str | None = None,
        sentinel_password: str | None = None,
        retries: int = 8,
        timeout_s: float = 5.0,
        pool_size: int = 128,
        pool_timeout_s: float = 10.0,
    ) -> RedisStore:
        """The current master of ``master`` as the Sentinels name it, found again after a failover.

        A connection asks the Sentinels for the master's address when it connects; a master that
        was demoted answers READONLY, which closes the connection and retries on the new master.
        """
        client, manager = sentinel_client(
            sentinels,
            master,
            db=db,
            username=username,
            password=password,
            sentinel_username=sentinel_username,
            sentinel_password=sentinel_password,
            retries=retries,
            timeout_s=timeout_s,
            pool_size=pool_size,
            pool_timeout_s=pool_timeout_s,
        )
        return cls(client, prefix, sentinel=manager)

    @classmethod
    def from_cluster(
        cls,
        url: str,
        *,
        prefix: str = "rr",
        retries: int = 8,
        timeout_s: float = 5.0,
        pool_size: int = 128,
        pool_timeout_s: float = 10.0,
    ) -> RedisStore:
        """A Redis Cluster, discovered from the node ``url`` names (any node of it).

        At most ``pool_size`` store calls run at once, each holding at most one connection per
        node, so a node's pool (``pool_size`` plus a few for the client's own topology reads)
        never runs out; a burst past it waits up to ``pool_timeout_s``.
        """
        client = cluster_client(url, retries=retries, timeout_s=timeout_s, pool_size=pool_size)
        return cls(client, prefix, gate=pool_size, gate_timeout_s=pool_timeout_s)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> RedisStore:
        """The store the settings name: ``redis_sentinels``, ``redis_cluster`` or ``redis_url``."""
        common: dict[str, Any] = {
            "prefix": settings.key_prefix,
            "retries": settings.store_retries,
            "timeout_s": settings.store_timeout_s,
            "pool_size": settings.redis_pool_size,
            "pool_timeout_s": settings.redis_pool_timeout_s,
        }
        if settings.redis_sentinels:
            assert settings.redis_sentinel_master is not None  # checked by the settings

            def secret(v: Any) -> str | None:
                return v.get_secret_value() if v is not None else None

            return cls.from_sentinel(
                settings.sentinel_addresses(),
                settings.redis_sentinel_master,
                db=settings.redis_db,
                username=settings.redis_username,
                password=secret(settings.redis_password),
                sentinel_username=settings.redis_sentinel_username,
                sentinel_password=secret(settings.redis_sentinel_password),
                **common,
            )
        assert settings.redis_url is not None  # checked by the settings
        if settings.redis_cluster:
            return cls.from_cluster(settings.redis_url, **common)
        return cls.from_url(settings.redis_url, **common)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        gate = self._gate
        if gate is not None:
            try:
                async with asyncio.timeout(self._gate_timeout_s):
                    await gate.acquire()
            except TimeoutError:
                raise StoreUnavailable(
                    f"redis: no connection free within {self._gate_timeout_s:g} s "
                    f"({self._gate_size} store calls in flight: redis_pool_size)"
                ) from None
        try:
            return await fn()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        finally:
            if gate is not None:
                gate.release()

    async def ping(self) -> None:
        await self._call(self._r.ping)

    async def durability_warning(self) -> str | None:
        # INFO, not CONFIG GET: CONFIG is often disabled by ACLs on managed Redis. An ACL
        # without INFO (-@dangerous) leaves it unknown: said so, not taken as durable.
        try:
            if self._cluster:
                # Every primary holds some namespaces: each must persist.
                per_node = await self._r.info("persistence", target_nodes=RedisCluster.PRIMARIES)
                infos = list(per_node.values()) if "aof_enabled" not in per_node else [per_node]
            else:
                infos = [await self._r.info("persistence")]
        except NoPermissionError:
            return (
                "cannot tell whether redis persists acknowledged feedback (this user may not "
                "run INFO): make sure it runs with appendonly yes, appendfsync always"
            )
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        if all(int(info.get("aof_enabled", 0)) for info in infos):
            return None
        return (
            "redis runs without AOF (appendonly no): feedback acknowledged since its last RDB "
            "save is lost if redis-server restarts; set appendonly yes, appendfsync always"
        )

    async def get_namespace(self, ns: str) -> NamespaceMeta | None:
        m = await self._call(lambda: self._r.hmget(self.keys.meta(ns), "gen", "config", "created"))
        if m[0] is None:
            return None
        return _meta(ns, *m)

    async def create_namespace(
        self, ns: str, config: dict[str, Any], *, limit: int | None = None
    ) -> tuple[NamespaceMeta, bool]:
        reg = await self._call(
            lambda: self._register(keys=[self.keys.namespaces()], args=[ns, limit or 0])
        )
        if isinstance(reg, list) and int(reg[0]) < 0:
            raise NamespaceLimit(f"{int(reg[1])} namespaces exist (max_namespaces {limit})")
        argv: list[str] = [new_gen(), json.dumps(config, sort_keys=True), repr(time.time())]
        res = await self._call(lambda: self._create(keys=[self.keys.meta(ns)], args=argv))
        return _meta(ns, res[1], res[2], res[3]), bool(res[0])

    def _generation_keys(self, ns: str, gen: str) -> list[str]:
        k = self.keys
        return [k.log(ns, gen), k.base(ns, gen), k.routes(ns, gen), k.snapshot(ns, gen)]

    async def reset_namespace(self, ns: str) -> NamespaceMeta | None:
        gen = new_gen()
        old = await self._call(lambda: self._reset(keys=[self.keys.meta(ns)], args=[gen]))
        if old is None:
            return None
        old_gen = old.decode() if isinstance(old, bytes) else str(old)
        # The old generation's log and counters are unreachable now; drop them to free memory.
        await self._call(lambda: self._r.delete(*self._generation_keys(ns, old_gen)))
        return await self.get_namespace(ns)

    async def delete_namespace(self, ns: str) -> bool:
        meta = await self.get_namespace(ns)
        if meta is not None:
            # One DEL of keys that share the namespace's slot: atomic, on a cluster too.
            keys = [self.keys.meta(ns), *self._generation_keys(ns, meta.gen)]
            await self._call(lambda: self._r.delete(*keys))
        # Then the name (also the clean-up of a name a crashed create left without meta). A
        # create of the same name between the two steps has made a new meta: it keeps its name.
        await self._call(lambda: self._r.srem(self.keys.namespaces(), ns))
        if await self._call(lambda: self._r.exists(self.keys.meta(ns))):
            await self._call(lambda: self._r.sadd(self.keys.namespaces(), ns))
        return meta is not None

    async def list_namespaces(self) -> list[str]:
        raw = await self._call(lambda: self._r.smembers(self.keys.namespaces()))
        names = sorted(n.decode() if isinstance(n, bytes) else str(n) for n in raw)

        async def have_meta() -> list[Any]:
            async with self._r.pipeline(transaction=False) as p:
                for n in names:
                    p.exists(self.keys.meta(n))
                return list(await p.execute())

        # A name whose creation did not finish (no meta) is not a namespace yet.
        found = await self._call(have_meta) if names else []
        return [n for n, e in zip(names, found, strict=True) if int(e)]

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
        ttl_ms = max(1, round(ttl_s * 1000))
        uids = route_uids(records, uids)
        k = self.keys
        sets = [
            (k.route(ns, gen, uid), encode_record(arm, h, uid))
            for uid, (arm, h) in zip(uids, records, strict=True)
        ]
        counts = {(k.routes(ns, gen), arm): c for arm, c in count_deltas(records, uncount).items()}
        if sets or counts:
            await self._route_writes.write(_RouteWrite(sets, counts, ttl_ms))
        return [f"{ns}:{gen}:{uid}" for uid in uids]

    async def _write_routes(self, jobs: Sequence[_RouteWrite]) -> None:
        """One pipeline for the route records of ``jobs`` (the callers of one loop turn)."""
        counts: Counter[tuple[str, int]] = Counter()
        for job in jobs:
            counts.update(job.counts)

        async def run() -> None:
            # Not a transaction: every SET is independent and idempotent (a retry rewrites the
            # same record), and the counters are statistics, not state the posterior needs.
            # One HINCRBY per (namespace, RM) for the whole batch, not one per route.
            async with self._r.pipeline(transaction=False) as p:
                for job in jobs:
                    for key, record in job.sets:
                        p.set(key, record, px=job.ttl_ms)
                for (key, arm), c in counts.items():
                    if c:
                        p.hincrby(key, str(arm), c)
                await p.execute()

        await self._call(run)

    async def apply_feedback(self, items: Sequence[tuple[str, float]]) -> list[FeedbackResult]:
        out: list[FeedbackResult | None] = [None] * len(items)
        by_ns: dict[str, list[tuple[int, RouteId, float]]] = {}
        for i, (text, reward) in enumerate(items):
            rid = RouteId.parse(text)
            if rid is None:
                out[i] = FeedbackResult(Outcome.UNKNOWN)
            else:
                by_ns.setdefault(rid.ns, []).append((i, rid, reward))
        # One script per namespace (its keys share one slot); in order, so the log's order
        # within a namespace is the batch's.
        for ns, where in by_ns.items():
            keys: list[str] = []
            args: list[bytes | str] = []
            for _, rid, reward in where:
                keys += [
                    self.keys.meta(ns),
                    self.keys.route(ns, rid.gen, rid.uid),
                    self.keys.log(ns, rid.gen),
                    self.keys.base(ns, rid.gen),
                ]
                args += [rid.gen, encode_reward(reward)]
            res = await self._call(partial(self._feedback, keys=keys, args=args))
            for (i, rid, _), code, arm in zip(where, res[::2], res[1::2], strict=True):
                code = int(code)
                if code > 0:
                    out[i] = FeedbackResult(Outcome.APPLIED, rid.ns, code, int(arm))
                elif code < 0:
                    out[i] = FeedbackResult(Outcome.DUPLICATE, rid.ns)
                else:
                    out[i] = FeedbackResult(Outcome.UNKNOWN)
        return [r for r in out if r is not None]

    async def read_tail(
        self, ns: str, gen: str, after_seq: int, limit: int | None = None
    ) -> tuple[NamespaceMeta | None, list[Observation], int]:
        async def run() -> list[Any]:
            # A script, so the generation, the base, the tail and the length are read at one
            # instant (the tail's index depends on the base).
            keys = [self.keys.meta(ns), self.keys.log(ns, gen), self.keys.base(ns, gen)]
            return list(await self._tail(keys=keys, args=[after_seq, limit or 0]))

        m_gen, config, created, base, length, *tail = await self._call(run)
        if m_gen is None or m_gen is False:
            return None, [], 0
        meta = _meta(ns, m_gen, config, created)
        if meta.gen != gen:
            return meta, [], 0
        start = max(after_seq, int(base))
        obs = [decode_entry(start + i + 1, e, ns, gen) for i, e in enumerate(tail)]
        return meta, obs, int(base) + int(length)

    async def trim_log(self, ns: str, gen: str, upto: int) -> int:
        keys = [self.keys.log(ns, gen), self.keys.base(ns, gen)]
        return int(await self._call(lambda: self._trim(keys=keys, args=[upto])))

    async def route_counts(self, ns: str, gen: str) -> dict[int, int]:
        raw = await self._call(lambda: self._r.hgetall(self.keys.routes(ns, gen)))
        return {int(k): int(v) for k, v in raw.items()}

    async def get_snapshot(self, ns: str, gen: str) -> tuple[int, bytes] | None:
        seq, blob = await self._call(
            lambda: self._r.hmget(self.keys.snapshot(ns, gen), "seq", "blob")
        )
        if seq is None or blob is None:
            return None
        return int(seq), blob if isinstance(blob, bytes) else blob.encode()

    async def put_snapshot(
        self, ns: str, gen: str, seq: int, blob: bytes, *, last_uid: str | None = None
    ) -> bool:
        keys = [self.keys.snapshot(ns, gen), self.keys.log(ns, gen), self.keys.base(ns, gen)]
        args: list[int | bytes | str] = [seq, blob, last_uid or ""]
        res = await self._call(lambda: self._snapshot(keys=keys, args=args))
        return bool(res)

    async def get_sticky(self, ns: str, gen: str, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        names = [self.keys.sticky(ns, gen, k) for k in keys]  # one slot: the namespace's tag
        values = await self._call(lambda: self._r.mget(names))
        return {k: v for k, v in zip(keys, values, strict=True) if v is not None}

    async def claim_sticky(self, ns: str, gen: str, key: str, value: bytes, ttl_s: float) -> bytes:
        # SET NX GET (Redis >= 7): one command sets the key if it is free and returns what was
        # there: None when this call claimed it. Atomic for every replica.
        ttl_ms = max(1, round(ttl_s * 1000))
        name = self.keys.sticky(ns, gen, key)
        old = await self._call(lambda: self._r.set(name, value, nx=True, px=ttl_ms, get=True))
        return value if old is None else bytes(old)

    async def aclose(self) -> None:
        await self._route_writes.drain()
        await self._r.aclose()
        if self._sentinel is not None:  # its clients of the Sentinels themselves
            for client in self._sentinel.sentinels:
                await client.aclose()
