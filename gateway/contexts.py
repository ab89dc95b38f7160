"""Pair -> context ``h``: what the posterior regresses on, computed off the event loop.

With a router artifact: the encoder and the router's MLP (+ intercept), in one worker thread;
concurrent requests are encoded together in passes of up to ``max_batch`` pairs. Without
one: ``h = [1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from reward_router.batching import MicroBatcher
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
    thread, never on the event loop; concurrent requests are encoded together
    (:class:`reward_router.batching.MicroBatcher`, passes of up to ``max_batch`` pairs).
    Without a router: h = [1] (the intercept alone)."""

    def __init__(
        self, router: Router | None, featurizer: Featurizer | None, max_batch: int = 64
    ) -> None:
        self.router = router
        self.featurizer = featurizer
        self.dim = router.dim if router is not None else 1
        self.prior_means = router.prior_means if router is not None else None
        self.max_batch = max_batch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rr-encode")
        self._batcher: MicroBatcher[PairIn, np.ndarray] | None = None

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

    def _rows(self, pairs: list[PairIn]) -> list[np.ndarray]:
        return list(self.compute(pairs))

    async def __call__(self, pairs: Sequence[PairIn]) -> np.ndarray:
        if self.router is None:
            return self.compute(pairs)
        if self._batcher is None:
            # No wait for company: a pass takes what is queued when the last one ends, so under
            # load passes fill up by themselves and a lone request is not delayed.
            self._batcher = MicroBatcher(
                self._rows, max_batch=self.max_batch, max_wait_s=0.0, executor=self._pool
            )
            await self._batcher.start()
        rows = await self._batcher.submit(list(pairs))
        return np.stack(rows) if rows else np.zeros((0, self.dim))

    async def aclose(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
