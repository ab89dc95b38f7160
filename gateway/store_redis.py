"""The Redis backend of the store: what lets several gateway replicas share a namespace.

Every read-modify-write is one Lua script (atomic on the server), registered once with its
KEYS/ARGV header; reads of several keys go in one pipeline. Keys: :mod:`gateway.keys`.

Durability: the gateway answers 200 on ``/v1/feedback`` only after the script returned, so with
``appendonly yes`` + ``appendfsync always`` an acknowledged feedback is on disk before the trainer
hears of it. Reconnects: redis-py retries connection errors with exponential back-off (a restart
of redis-server takes about a second). Retrying the feedback script is safe: if the first try was
applied and only its reply got lost, the retry finds the record marked and reports "duplicate";
the observation is in the log once either way.

>>> store = RedisStore.from_url("redis://127.0.0.1:6390/0")     # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.keys import Keys
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
    new_uid,
)

T = TypeVar("T")

# KEYS[1] meta, KEYS[2] namespaces set
# ARGV[1] ns, ARGV[2] gen, ARGV[3] config JSON, ARGV[4] created, ARGV[5] limit (0: none)
# -> {1 if created else 0, gen, config, created}, or {-1, count} past the limit
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  local n = redis.call('SCARD', KEYS[2])
  if tonumber(ARGV[5]) > 0 and n >= tonumber(ARGV[5]) then
    return {-1, n}
  end
  redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'config', ARGV[3], 'created', ARGV[4])
  redis.call('SADD', KEYS[2], ARGV[1])
  return {1, ARGV[2], ARGV[3], ARGV[4]}
end
local m = redis.call('HMGET', KEYS[1], 'gen', 'config', 'created')
return {0, m[1], m[2], m[3]}
"""

# KEYS[1] meta; ARGV[1] new gen -> old gen, or false if the namespace does not exist
_RESET = """
local old = redis.call('HGET', KEYS[1], 'gen')
if not old then return false end
redis.call('HSET', KEYS[1], 'gen', ARGV[1])
return old
"""

# Exactly-once feedback, for a batch; per item i: KEYS meta_i, route_i, log_i, base_i and ARGV
# gen_i, reward_i (packed float64). Per item two numbers: 0 unknown, -1 duplicate or seq (> 0)
# applied (entries trimmed off the log's head + its new length); then the RM index of an applied
# item (the record's first two bytes, little-endian), else -1.
_FEEDBACK = """
local out = {}
for i = 1, #KEYS / 4 do
  local meta, route, log = KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1]
  local rec = redis.call('GET', route)
  out[2 * i] = -1
  if not rec or redis.call('HGET', meta, 'gen') ~= ARGV[2 * i - 1] then
    out[2 * i - 1] = 0
  elseif rec == 'A' then
    out[2 * i - 1] = -1
  else
    local base = tonumber(redis.call('GET', KEYS[4 * i]) or '0')
    out[2 * i - 1] = base + redis.call('RPUSH', log, ARGV[2 * i] .. rec)
    out[2 * i] = string.byte(rec, 1) + 256 * string.byte(rec, 2)
    redis.call('SET', route, 'A', 'KEEPTTL')
  end
end
return out
"""


# KEYS[1] snapshot hash, KEYS[2] log, KEYS[3] base; ARGV[1] seq, ARGV[2] blob, ARGV[3] the uid
# the log's entry at seq must end with ('' = unchecked) -> 1 stored, 0 a newer one is there or
# the log does not hold that entry (it went backwards since the state was read: never a
# snapshot ahead of it)
_SNAPSHOT = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if ARGV[3] ~= '' then
  local base = tonumber(redis.call('GET', KEYS[3]) or '0')
  local idx = tonumber(ARGV[1]) - 1 - base
  if idx < 0 then return 0 end
  local e = redis.call('LINDEX', KEYS[2], idx)
  if not e or string.sub(e, -#ARGV[3]) ~= ARGV[3] then return 0 end
end
if tonumber(ARGV[1]) > cur then
  redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'blob', ARGV[2])
  return 1
end
return 0
"""


# KEYS[1] meta, KEYS[2] log, KEYS[3] base; ARGV[1] after_seq, ARGV[2] limit (0: all)
# -> {gen, config, created, base, length of the list, entries after after_seq...}; gen is nil
# when the namespace does not exist
_TAIL = """
local m = redis.call('HMGET', KEYS[1], 'gen', 'config', 'created')
if not m[1] then return {false, false, false, 0, 0} end
local base = tonumber(redis.call('GET', KEYS[3]) or '0')
local out = {m[1], m[2], m[3], base, redis.call('LLEN', KEYS[2])}
local start = math.max(tonumber(ARGV[1]), base) - base
local stop = -1
if tonumber(ARGV[2]) > 0 then stop = start + tonumber(ARGV[2]) - 1 end
local tail = redis.call('LRANGE', KEYS[2], start, stop)
for i = 1, #tail do out[5 + i] = tail[i] end
return out
"""

# KEYS[1] log, KEYS[2] base; ARGV[1] upto -> the new base (entries seq <= upto dropped)
_TRIM = """
local base = tonumber(redis.call('GET', KEYS[2]) or '0')
local upto = math.min(tonumber(ARGV[1]), base + redis.call('LLEN', KEYS[1]))
if upto > base then
  redis.call('LTRIM', KEYS[1], upto - base, -1)
  redis.call('SET', KEYS[2], upto)
  base = upto
end
return base
"""


def _meta(ns: str, gen: Any, config: Any, created: Any) -> NamespaceMeta:
    def s(x: Any) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)

    return NamespaceMeta(ns, s(gen), json.loads(s(config)), float(s(created)))


class _Retry(Retry):
    """redis-py's retry, except that a refused login is final.

    ``AuthenticationError`` subclasses ``ConnectionError``, so plain ``Retry`` backs off through
    every try (~6 s with the defaults) before the wrong-password message arrives; a health check
    with a 5 s timeout then sees a timeout instead of the reason.
    """

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def retryable(error: Exception) -> bool:
            if isinstance(error, AuthenticationError):
                return False
            return is_retryable(error) if is_retryable is not None else True

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


class RedisStore:
    """Store on a Redis server; see :mod:`gateway.store` for the contract."""

    def __init__(self, client: aioredis.Redis, prefix: str = "rr") -> None:
        self._r = client
        self.keys = Keys(prefix)
        self._create = client.register_script(_CREATE)
        self._reset = client.register_script(_RESET)
        self._feedback = client.register_script(_FEEDBACK)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._trim = client.register_script(_TRIM)
        self._tail = client.register_script(_TAIL)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "rr", retries: int = 8, timeout_s: float = 5.0
    ) -> RedisStore:
        """A store with reconnects: ``retries`` tries, back-off 50 ms doubling to 1 s."""
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=_Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
            health_check_interval=30,
        )
        return cls(client, prefix)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def ping(self) -> None:
        await self._call(self._r.ping)

    async def durability_warning(self) -> str | None:
        # INFO, not CONFIG GET: CONFIG is often disabled by ACLs on managed Redis. An ACL
        # without INFO (-@dangerous) leaves it unknown: said so, not taken as durable.
        try:
            info = await self._r.info("persistence")
        except NoPermissionError:
            return (
                "cannot tell whether redis persists acknowledged feedback (this user may not "
                "run INFO): make sure it runs with appendonly yes, appendfsync always"
            )
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        if int(info.get("aof_enabled", 0)):
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
        argv: list[str | int] = [
            ns,
            new_gen(),
            json.dumps(config, sort_keys=True),
            repr(time.time()),
            limit or 0,
        ]
        res = await self._call(
            lambda: self._create(keys=[self.keys.meta(ns), self.keys.namespaces()], args=argv)
        )
        if int(res[0]) < 0:
            raise NamespaceLimit(f"{int(res[1])} namespaces exist (max_namespaces {limit})")
        return _meta(ns, res[1], res[2], res[3]), bool(res[0])

    async def reset_namespace(self, ns: str) -> NamespaceMeta | None:
        gen = new_gen()
        old = await self._call(lambda: self._reset(keys=[self.keys.meta(ns)], args=[gen]))
        if old is None:
            return None
        old_gen = old.decode() if isinstance(old, bytes) else str(old)
        # The old generation's log and counters are unreachable now; drop them to free memory.
        await self._call(
            lambda: self._r.delete(
                self.keys.log(ns, old_gen),
                self.keys.base(ns, old_gen),
                self.keys.routes(ns, old_gen),
                self.keys.snapshot(ns, old_gen),
            )
        )
        return await self.get_namespace(ns)

    async def delete_namespace(self, ns: str) -> bool:
        meta = await self.get_namespace(ns)
        if meta is None:
            return False

        async def run() -> None:
            async with self._r.pipeline(transaction=True) as p:
                p.delete(self.keys.meta(ns))
                p.srem(self.keys.namespaces(), ns)
                p.delete(
                    self.keys.log(ns, meta.gen),
                    self.keys.base(ns, meta.gen),
                    self.keys.routes(ns, meta.gen),
                    self.keys.snapshot(ns, meta.gen),
                )
                await p.execute()

        await self._call(run)
        return True

    async def list_namespaces(self) -> list[str]:
        names = await self._call(lambda: self._r.smembers(self.keys.namespaces()))
        return sorted(n.decode() if isinstance(n, bytes) else str(n) for n in names)

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
        uids = list(uids) if uids is not None else [new_uid() for _ in records]
        counts = count_deltas(records, uncount)

        async def run() -> None:
            # Not a transaction: every SET is independent and idempotent (a retry rewrites the
            # same record), and the counters are statistics, not state the posterior needs.
            async with self._r.pipeline(transaction=False) as p:
                for uid, (arm, h) in zip(uids, records, strict=True):
                    p.set(self.keys.route(ns, gen, uid), encode_record(arm, h, uid), px=ttl_ms)
                for arm, c in counts.items():
                    if c:
                        p.hincrby(self.keys.routes(ns, gen), str(arm), c)
                await p.execute()

        await self._call(run)
        return [f"{ns}:{gen}:{uid}" for uid in uids]

    async def apply_feedback(self, items: Sequence[tuple[str, float]]) -> list[FeedbackResult]:
        out: list[FeedbackResult | None] = [None] * len(items)
        keys: list[str] = []
        args: list[bytes | str] = []
        where: list[tuple[int, RouteId]] = []
        for i, (text, reward) in enumerate(items):
            rid = RouteId.parse(text)
            if rid is None:
                out[i] = FeedbackResult(Outcome.UNKNOWN)
                continue
            keys += [
                self.keys.meta(rid.ns),
                self.keys.route(rid.ns, rid.gen, rid.uid),
                self.keys.log(rid.ns, rid.gen),
                self.keys.base(rid.ns, rid.gen),
            ]
            args += [rid.gen, encode_reward(reward)]
            where.append((i, rid))
        if where:
            res = await self._call(lambda: self._feedback(keys=keys, args=args))
            for (i, rid), code, arm in zip(where, res[::2], res[1::2], strict=True):
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

    async def aclose(self) -> None:
        await self._r.aclose()
