"""The serving object of one RM service: the backend, its micro-batchers and the checks around
them. The HTTP layer (:mod:`services.api`) validates bodies and calls :meth:`RMServing.score`,
:meth:`RMServing.compare` and :meth:`RMServing.info`; every failure is a
:class:`~services.errors.ServiceError`, mapped to HTTP in one place.

>>> settings = load_settings("deploy/rms/length.yaml")         # doctest: +SKIP
>>> serving = RMServing(settings, make_backend(settings))       # doctest: +SKIP
>>> await serving.load()                                        # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from reward_router.batching import MicroBatcher, QueueFull
from reward_router.data import Message
from reward_router.heap import freeze_startup_heap
from reward_router.protocol import (
    CompareRequest,
    CompareResponse,
    CompareResult,
    InfoResponse,
    ScoreRequest,
    ScoreResponse,
)
from reward_router.protocol import Message as WireMessage
from services.backends import Backend, Compared, PairInput, Scored, ScoreInput
from services.errors import (
    BatchTooLarge,
    InputTooLong,
    InvalidInput,
    ModelError,
    NotReady,
    Overloaded,
    RequestTimeout,
    ServiceError,
)
from services.metrics import ServiceMetrics
from services.settings import ServiceSettings

log = logging.getLogger("reward_router.services")


class RMServing:
    """One RM service's work, independent of HTTP: built once per app (in the lifespan) and kept
    on ``app.state.rm``; the routes of :mod:`services.api` only call it."""

    def __init__(self, settings: ServiceSettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = ServiceMetrics(settings.name)
        # One thread: forward passes run one at a time, off the event loop. The model is not
        # assumed thread-safe, and torch already uses every core inside one pass.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rm-{settings.name}")
        self.ready = False
        self.load_error: str | None = None
        self.score_batcher: MicroBatcher[ScoreInput, Scored] | None = None
        self.compare_batcher: MicroBatcher[PairInput, Compared] | None = None

    def batcher(self, fn: Callable[[list[Any]], list[Any]]) -> MicroBatcher[Any, Any]:
        s, m = self.settings, self.metrics

        def on_batch(size: int, seconds: float) -> None:
            m.batch_size.labels(s.name).observe(size)
            m.forward.labels(s.name).observe(seconds)

        return MicroBatcher(
            fn,
            max_batch=s.max_batch_size,
            max_wait_s=s.batch_wait_ms / 1000.0,
            executor=self.executor,
            enabled=s.microbatch,
            on_batch=on_batch,
            on_queue=lambda n: m.queue.labels(s.name).set(n),
            max_queued=s.max_queued_items,
        )

    async def load(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.backend.load)
        except Exception as exc:  # a service that cannot load says why on /readyz
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("rm %s failed to load: %s", self.settings.name, self.load_error)
            return
        self.score_batcher = self.batcher(self.backend.score_batch)
        await self.score_batcher.start()
        if self.backend.pairwise:
            self.compare_batcher = self.batcher(self.backend.compare_batch)
            await self.compare_batcher.start()
        # The loaded model, torch and FastAPI leave the cyclic GC's view (reward_router.heap):
        # unfrozen, each full collection under load paused every request for 50-140 ms.
        freeze_startup_heap()
        self.ready = True
        self.metrics.ready.labels(self.settings.name).set(1)
        log.info(
            "rm %s ready (%s, %s)", self.settings.name, self.backend.kind, self.backend.model_ref
        )

    async def close(self) -> None:
        for b in (self.score_batcher, self.compare_batcher):
            if b is not None:
                await b.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.backend.close()

    # ---- the work of the routes --------------------------------------------------------------

    async def run(self, batcher: MicroBatcher[Any, Any] | None, items: Sequence[Any]) -> list[Any]:
        """``items`` through ``batcher`` (one forward pass at a time), every failure typed."""
        s = self.settings
        if not self.ready or batcher is None:
            reason = self.load_error or "model is loading"
            raise NotReady(f"rm {s.name!r} is not ready: {reason}")
        try:
            async with asyncio.timeout(s.request_timeout_s):
                return await batcher.submit(items)
        except QueueFull as exc:
            raise Overloaded(
                f"rm {s.name!r} is overloaded: {exc} (max_queued_items "
                f"{s.max_queued_items}); retry after {s.retry_after_s} s"
            ) from None
        except TimeoutError as exc:
            raise RequestTimeout(
                f"rm {s.name!r} did not answer within {s.request_timeout_s}s"
            ) from exc
        except ServiceError:
            raise
        except Exception as exc:  # the backend raised inside the forward pass
            raise ModelError(f"rm {s.name!r} failed: {type(exc).__name__}: {exc}") from exc

    async def score(self, body: ScoreRequest) -> ScoreResponse:
        s = self.settings
        _check_size(len(body.items), "items", s)
        self.metrics.items.labels(s.name, "/v1/score").inc(len(body.items))
        inputs = [
            ScoreInput(_messages(it.prompt, f"items[{i}].prompt"), it.response, it.reference)
            for i, it in enumerate(body.items)
        ]
        results: list[Scored] = await self.run(self.score_batcher, inputs)
        _refuse_too_long([r.too_long for r in results], "items", s)
        truncated = [i for i, r in enumerate(results) if r.truncated]
        self.metrics.truncated.labels(s.name).inc(len(truncated))
        return ScoreResponse(
            model=s.name,
            scores=[_finite(r.score, s.name) for r in results],
            truncated=truncated,
            abstained=[i for i, r in enumerate(results) if r.abstained],
        )

    async def compare(self, body: CompareRequest) -> CompareResponse:
        s = self.settings
        _check_size(len(body.pairs), "pairs", s)
        self.metrics.items.labels(s.name, "/v1/compare").inc(len(body.pairs))
        prompts = [_messages(p.prompt, f"pairs[{i}].prompt") for i, p in enumerate(body.pairs)]
        compared = await self._compared(prompts, body)
        _refuse_too_long([c.too_long for c in compared], "pairs", s)
        results: list[CompareResult] = []
        for c, p in zip(compared, body.pairs, strict=True):
            a, b = _finite(c.score_a, s.name), _finite(c.score_b, s.name)
            # An abstaining RM (verifier without reference) has no preference: a tie. So are two
            # identical responses, whatever float noise their separate micro-batches left.
            same = p.response_a == p.response_b
            pref = "tie" if c.abstained or same else _preferred(a, b, s.tie_epsilon)
            results.append(CompareResult(score_a=a, score_b=b, preferred=pref))  # type: ignore[arg-type]
        truncated = [i for i, c in enumerate(compared) if c.truncated]
        self.metrics.truncated.labels(s.name).inc(len(truncated))
        return CompareResponse(
            model=s.name,
            results=results,
            truncated=truncated,
            abstained=[i for i, c in enumerate(compared) if c.abstained],
        )

    async def _compared(self, prompts: list[list[Message]], body: CompareRequest) -> list[Compared]:
        if self.backend.pairwise:
            pairs = [
                PairInput(m, p.response_a, p.response_b, p.reference)
                for m, p in zip(prompts, body.pairs, strict=True)
            ]
            out: list[Compared] = await self.run(self.compare_batcher, pairs)
            return out
        # Pointwise RM: both sides of every pair go into the same micro-batch.
        flat = [
            ScoreInput(m, resp, p.reference)
            for m, p in zip(prompts, body.pairs, strict=True)
            for resp in (p.response_a, p.response_b)
        ]
        scored: list[Scored] = await self.run(self.score_batcher, flat)
        return [
            Compared(
                a.score,
                b.score,
                truncated=a.truncated or b.truncated,
                abstained=a.abstained or b.abstained,
                too_long=a.too_long or b.too_long,
            )
            for a, b in zip(scored[0::2], scored[1::2], strict=True)
        ]

    def info(self) -> InfoResponse:
        s = self.settings
        return InfoResponse(
            name=s.name,
            backend=s.backend,
            model=self.backend.model_ref,
            pairwise=self.backend.pairwise,
            max_batch_size=s.max_batch_size,
            max_request_items=s.max_request_items,
            max_length=s.max_length,
            truncation=s.truncation,
            microbatch=s.microbatch,
            ready=self.ready,
        )

    def check_ready(self) -> None:
        if not self.ready:
            reason = self.load_error or "loading"
            raise NotReady(f"rm {self.settings.name!r} is not ready: {reason}")


def _messages(prompt: str | list[WireMessage], field: str) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not prompt:
        raise InvalidInput(f"{field}: a message list must not be empty", field=field)
    return [{"role": m.role, "content": m.content} for m in prompt]


def _check_size(n: int, field: str, settings: ServiceSettings) -> None:
    if n == 0:
        raise InvalidInput(f"{field}: must not be empty", field=field)
    if n > settings.max_request_items:
        raise BatchTooLarge(
            f"{field}: {n} entries, more than this service's max_request_items "
            f"({settings.max_request_items}); split the request",
            field=field,
        )


def _refuse_too_long(flags: Sequence[bool], field: str, settings: ServiceSettings) -> None:
    """422 naming the first entry that does not fit (only under truncation ``error``)."""
    for i, too_long in enumerate(flags):
        if too_long:
            raise InputTooLong(
                f"{field}[{i}]: longer than max_length ({settings.max_length} tokens) and "
                "truncation is 'error'",
                field=f"{field}[{i}]",
            )


def _finite(value: float, rm: str) -> float:
    if not math.isfinite(value):
        raise ModelError(f"rm {rm!r} produced a non-finite score ({value})", rm=rm)
    return value


def _preferred(a: float, b: float, eps: float) -> str:
    if abs(a - b) <= eps:
        return "tie"
    return "a" if a > b else "b"
