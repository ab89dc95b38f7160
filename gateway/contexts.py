"""Pair -> context ``h``: what the posterior regresses on, computed off the event loop.

With a router artifact: the encoder and the router's MLP (+ intercept), in one worker thread;
concurrent requests are encoded together in one batch. Without one: ``h = [1]``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from reward_router.protocol import PairIn


class Router(Protocol):
    """What the gateway needs of ``gateway.offline.model.OfflineRouter``."""

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
