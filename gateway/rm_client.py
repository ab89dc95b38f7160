"""Clients for the RM scoring services: explicit timeouts, health checks, cooldown, typed errors.

Exception tree (what the gateway's fallback logic branches on)::

    RMError
    ├── RMUnavailable   the RM failed: refused, timed out, 5xx, malformed answer, or 401/403
    │                   (it refused the gateway's rms[].api_key: a misconfiguration).
    │                   Counts toward cooldown; the pair falls back to the next-best RM.
    └── RMRejected      the RM answered 4xx: the caller's input is bad for it. No cooldown, no
                        fallback (another RM would reject it too); the caller gets a 422.

Cooldown: after ``failure_threshold`` consecutive failures an RM is skipped for ``cooldown_s``.
The way back in: when the cooldown ends the RM is "half-open" — the next request tries it; one
successful call clears the failure count, one more failure starts a new cooldown. A failed health
check (``/readyz`` not 200) also marks it unavailable until a check passes; a passing one does not
clear the failure count (a process can be up and still time out or answer garbage).

>>> client = RMClient("len", "http://127.0.0.1:9000")             # doctest: +SKIP
>>> results = await client.compare([{"prompt": "2+2?", "response_a": "4",
...                                  "response_b": "5"}])         # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from reward_router.errors import RewardRouterError


class RMError(RewardRouterError):
    """Base of the RM client's errors."""

    def __init__(self, rm: str, message: str) -> None:
        self.rm = rm
        super().__init__(f"{rm}: {message}")


class RMUnavailable(RMError):
    """The RM failed (connection, timeout, 5xx, malformed answer)."""


class RMRejected(RMError):
    """The RM rejected the input with a 4xx; ``detail`` is its error body."""

    def __init__(self, rm: str, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(rm, f"rejected the input with {status}: {detail}")


@dataclass(frozen=True)
class Comparison:
    """One RM's verdict on one pair."""

    score_a: float
    score_b: float
    preferred: str


def _parse_results(rm: str, body: Any, n: int) -> list[Comparison]:
    try:
        results = body["results"]
        if len(results) != n:
            raise ValueError(f"{len(results)} results for {n} pairs")
        out = []
        for r in results:
            a, b, p = float(r["score_a"]), float(r["score_b"]), str(r["preferred"])
            if p not in ("a", "b", "tie") or not (math.isfinite(a) and math.isfinite(b)):
                raise ValueError(f"bad result {r!r}")
            out.append(Comparison(a, b, p))
        return out
    except (KeyError, TypeError, ValueError) as exc:
        raise RMUnavailable(rm, f"malformed /v1/compare answer: {exc}") from None


_Job = tuple[list[dict[str, Any]], "asyncio.Future[list[Comparison]]"]


def _fail(fut: asyncio.Future[list[Comparison]], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class RMClient:
    """One RM service: an httpx.AsyncClient with explicit timeouts plus its health state."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        connect_timeout_s: float = 1.0,
        read_timeout_s: float = 60.0,
        max_batch: int = 64,
        failure_threshold: int = 3,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.max_batch = max_batch
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        # write/pool get the read budget: a big batch upload or a queue for a connection is
        # still part of "waiting for this RM".
        timeout = httpx.Timeout(
            connect=connect_timeout_s,
            read=read_timeout_s,
            write=read_timeout_s,
            pool=read_timeout_s,
        )
        # The RM service's key (services/settings.py api_key) rides on every call as a bearer
        # header; it lives only in the client's headers, which nothing logs.
        headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.AsyncClient(
            base_url=self.url,
            timeout=timeout,
            transport=transport,
            headers=headers,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )
        self._pending: list[_Job] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.consecutive_failures = 0
        self.cooldown_until = 0.0
        self.healthy = True  # until a health check says otherwise
        self.last_error: str | None = None

    # ---- state ----------------------------------------------------------------------------

    def in_cooldown(self) -> bool:
        return self._clock() < self.cooldown_until

    def available(self) -> bool:
        """Worth asking now: healthy at the last check and not cooling down."""
        return self.healthy and not self.in_cooldown()

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.cooldown_until = 0.0
        self.healthy = True
        self.last_error = None

    def record_failure(self, message: str) -> None:
        self.consecutive_failures += 1
        self.last_error = message
        if self.consecutive_failures >= self.failure_threshold:
            self.cooldown_until = self._clock() + self.cooldown_s

    # ---- calls ----------------------------------------------------------------------------

    async def compare(self, pairs: Sequence[dict[str, Any]]) -> list[Comparison]:
        """``POST /v1/compare`` for ``pairs``; raises :class:`RMError`.

        Calls made in the same event-loop turn (concurrent requests routed to this RM) are
        merged into one HTTP call of up to ``max_batch`` pairs: under load that turns hundreds
        of one-pair calls into a few batched ones (the RM batches anyway), and a failure of a
        merged call counts once toward cooldown.
        """
        if not pairs:
            return []
        fut: asyncio.Future[list[Comparison]] = asyncio.get_running_loop().create_future()
        self._pending.append((list(pairs), fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # one loop turn: let the other callers of this moment join
        jobs, self._pending = self._pending, []
        chunks: list[list[_Job]] = [[]]
        size = 0
        for job in jobs:
            if chunks[-1] and size + len(job[0]) > self.max_batch:
                chunks.append([])
                size = 0
            chunks[-1].append(job)
            size += len(job[0])
        for chunk in chunks:
            task = asyncio.create_task(self._send(chunk))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job[1].done()]  # callers gone already: not asked
        if not jobs:
            return
        allpairs = [p for pairs, _ in jobs for p in pairs]

        async def call() -> list[Comparison]:
            out: list[Comparison] = []
            for start in range(0, len(allpairs), self.max_batch):
                out += await self._compare_chunk(allpairs[start : start + self.max_batch])
            return out

        # When every caller of this call went away (their requests were cancelled: the client
        # disconnected), the HTTP call is cancelled too, so the RM drops the pairs from its queue.
        work = asyncio.ensure_future(call())

        def abandon(_: object) -> None:
            if all(fut.cancelled() for _, fut in jobs) and not work.done():
                work.cancel()

        for _, fut in jobs:
            fut.add_done_callback(abandon)
        try:
            results = await work
        except asyncio.CancelledError:
            if all(fut.cancelled() for _, fut in jobs):
                return
            raise
        except RMRejected as exc:
            if len(jobs) == 1:
                _fail(jobs[0][1], exc)
                return
            # Someone's input was bad for the RM: ask again per caller, so only they get the 4xx.
            await asyncio.gather(*(self._send([job]) for job in jobs))
            return
        except Exception as exc:  # RMUnavailable, or a bug: every waiting caller hears of it
            for _, fut in jobs:
                _fail(fut, exc)
            return
        start = 0
        for pairs, fut in jobs:
            if not fut.done():
                fut.set_result(results[start : start + len(pairs)])
            start += len(pairs)

    async def _compare_chunk(self, pairs: list[dict[str, Any]]) -> list[Comparison]:
        try:
            resp = await self._http.post("/v1/compare", json={"pairs": pairs})
        except httpx.HTTPError as exc:
            err = RMUnavailable(self.name, f"{type(exc).__name__}: {exc}")
            self.record_failure(str(err))
            raise err from None
        if resp.status_code in (401, 403):
            # The RM refused the gateway's own credentials: a misconfiguration of this RM
            # (rms[].api_key), not the caller's input, so it counts as a failure and falls back.
            err = RMUnavailable(
                self.name, f"HTTP {resp.status_code}: the RM refused the gateway's api_key"
            )
            self.record_failure(str(err))
            raise err
        if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
            # The caller's input: the RM is fine, so neither cooldown nor failure count.
            try:
                detail = resp.json()
            except ValueError:
                detail = resp.text[:500]
            raise RMRejected(self.name, resp.status_code, detail)
        if resp.status_code != 200:
            err = RMUnavailable(self.name, f"HTTP {resp.status_code}: {resp.text[:200]}")
            self.record_failure(str(err))
            raise err
        try:
            body = resp.json()
        except ValueError:
            body = None
        try:
            results = _parse_results(self.name, body, len(pairs))
        except RMUnavailable as err:
            self.record_failure(str(err))
            raise
        self.record_success()
        return results

    async def check_health(self) -> bool:
        """``GET /readyz``; updates :attr:`healthy`.

        A passing check says the process is up, not that its answers are any good, so it leaves
        the count of failed calls alone: an RM whose ``/readyz`` passes while its compare calls
        time out or answer garbage still reaches ``failure_threshold`` and cools down, instead
        of costing every pair routed to it a timeout. Only a successful call clears the count.
        """
        try:
            resp = await self._http.get("/readyz")
            ok = resp.status_code == 200
        except httpx.HTTPError as exc:
            ok = False
            self.last_error = f"health check: {type(exc).__name__}"
        self.healthy = ok
        return ok

    async def aclose(self) -> None:
        await self._http.aclose()


class RMPool:
    """The RMs in the router's order (index = arm), with a background health-check loop."""

    def __init__(self, clients: Sequence[RMClient], health_interval_s: float = 2.0) -> None:
        self.clients = list(clients)
        self.by_name = {c.name: c for c in self.clients}
        self.health_interval_s = health_interval_s
        self._task: asyncio.Task[None] | None = None

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.clients]

    async def check_all(self) -> list[bool]:
        return list(await asyncio.gather(*(c.check_health() for c in self.clients)))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_all()

    async def start(self) -> None:
        """One check now (so /readyz is right from the start), then one every interval."""
        await self.check_all()
        self._task = asyncio.create_task(self._loop())

    def any_available(self) -> bool:
        return any(c.available() for c in self.clients)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(c.aclose() for c in self.clients))
