"""Micro-batching: concurrent requests share forward passes, which never block the event loop
(an RM service's model; the gateway's pair encoder).

A :class:`MicroBatcher` owns one queue and one worker task. Each request submits its list of
items and awaits a future. The worker takes the first waiting request, then keeps gathering
requests for up to ``max_wait_s`` or until ``max_batch`` items are held, runs one forward pass
(in chunks of ``max_batch``) in a worker thread, and scatters the answers back in order. While
a pass runs, new requests queue up, so under load the next pass is full without waiting.

With ``enabled=False`` every request gets forward passes of its own (the baseline the
benchmark compares against).

>>> batcher = MicroBatcher(model_fn, max_batch=32, max_wait_s=0.005, executor=pool)
...                                                      # doctest: +SKIP
>>> await batcher.start(); scores = await batcher.submit(items)   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Job(Generic[T, R]):
    items: Sequence[T]
    future: asyncio.Future[list[R]]
    results: list[R] = field(default_factory=list)


class QueueFull(Exception):
    """``max_queued`` items are waiting already (the service answers 503 + Retry-After)."""


class MicroBatcher(Generic[T, R]):
    """Gather concurrent submissions into forward passes of at most ``max_batch`` items."""

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        *,
        max_batch: int,
        max_wait_s: float,
        executor: Executor,
        enabled: bool = True,
        on_batch: Callable[[int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
        max_queued: int | None = None,
    ) -> None:
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.enabled = enabled
        self._executor = executor
        self._on_batch = on_batch
        self._on_queue = on_queue
        self.max_queued = max_queued
        self._queue: asyncio.Queue[_Job[T, R]] = asyncio.Queue()
        self._queued_items = 0
        # Items submitted and not yet in a forward pass (queued, or held while the worker
        # gathers a batch); max_queued bounds this.
        self._waiting = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("service is shutting down"))

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue ``items`` for the next forward pass; their results, in order."""
        if self._task is None or self._task.done():
            raise RuntimeError("micro-batcher is not running")
        # Bounded: past max_queued waiting items a request is refused, never queued (an empty
        # queue takes any one request, so a single large one is never refused forever).
        limit, waiting = self.max_queued, self._waiting
        if limit is not None and waiting and waiting + len(items) > limit:
            raise QueueFull(f"{waiting} items wait for a forward pass already")
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(items, future))
        self._queued(len(items))
        self._waiting += len(items)
        return await future

    def _queued(self, delta: int) -> None:
        self._queued_items += delta
        if self._on_queue is not None:
            self._on_queue(self._queued_items)

    def _take_nowait(self) -> _Job[T, R]:
        job = self._queue.get_nowait()
        self._queued(-len(job.items))
        return job

    async def _gather(self) -> list[_Job[T, R]]:
        jobs: list[_Job[T, R]] = []
        held = 0
        while not jobs:
            job = await self._queue.get()
            self._queued(-len(job.items))
            # A request whose client gave up (timeout, disconnect) costs no forward pass.
            if not job.future.done():
                jobs.append(job)
                held += len(job.items)
            else:
                self._waiting -= len(job.items)
        if not self.enabled:
            return jobs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while held < self.max_batch:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    # asyncio.timeout, not wait_for: no helper task, and a timed-out get()
                    # leaves its item in the queue.
                    async with asyncio.timeout(remaining):
                        job = await self._queue.get()
                except TimeoutError:
                    break
                self._queued(-len(job.items))
            else:
                job = self._take_nowait()
            if not job.future.done():
                jobs.append(job)
                held += len(job.items)
            else:
                self._waiting -= len(job.items)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            gathered = await self._gather()
            # Gone while the batch was being gathered (the client disconnected): not run.
            jobs = [job for job in gathered if not job.future.done()]
            self._waiting -= sum(len(job.items) for job in gathered)
            if not jobs:
                continue
            flat = [item for job in jobs for item in job.items]
            try:
                results: list[R] = []
                for start in range(0, len(flat), self.max_batch):
                    chunk = flat[start : start + self.max_batch]
                    t0 = time.perf_counter()
                    out = await loop.run_in_executor(self._executor, self._fn, chunk)
                    if len(out) != len(chunk):
                        raise RuntimeError(f"backend returned {len(out)} results for {len(chunk)}")
                    if self._on_batch is not None:
                        self._on_batch(len(chunk), time.perf_counter() - t0)
                    results.extend(out)
            except Exception as exc:  # the model failed: every request of this pass learns it
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            pos = 0
            for job in jobs:
                part = results[pos : pos + len(job.items)]
                pos += len(job.items)
                if not job.future.done():
                    job.future.set_result(part)
