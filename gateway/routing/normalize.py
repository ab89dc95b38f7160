"""Reward normalisers: turn the trainer's raw reward (−DPO loss) into a reward in [0, 1].

Both are small stateful objects: ``normalize(raw)`` first adds the batch to the state, then returns
each value's normalised reward in batch order (so the values of one batch are treated alike,
whatever their order inside it). Their state is a plain JSON-able dict (``state()`` /
``from_state()``) so a gateway can keep it in Redis next to the posteriors.

Warm-up rule (both): until ``warmup`` raw values have been seen, ``normalize`` returns the neutral
value 0.5 — the mean of a uniform quantile, and the value every RM would get if rewards carried
no information. It is neutral *between* RMs (whichever RM was asked, the same 0.5 is learned), so a
warm-up batch cannot favour an RM by the luck of landing on the first few, noisy ranks (with two
values in the window one is 0 and the other 1). Passing the raw reward through instead would put
values on another scale (−DPO loss is unbounded) into a posterior that expects [0, 1]. Warm-up
values still enter the window / running statistics.

>>> q = QuantileNormalizer(window=4, warmup=2)
>>> q.normalize(np.array([3.0])).tolist()
[0.5]
>>> q.normalize(np.array([1.0, 2.0])).tolist()
[0.0, 0.5]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gateway.routing.config import check_array, check_int, check_number
from reward_router.errors import ConfigError

NEUTRAL = 0.5


class QuantileNormalizer:
    """The paper's quantile normalisation over a sliding window of the last ``window`` raw values.

    The normalised reward of a value x is its mid-rank within the window (which includes x),
    ``(#{v < x} + (#{v == x} - 1) / 2) / (n - 1)``: 0 for the window's unique minimum, 1 for its
    unique maximum, 0.5 when all values are equal. During warm-up (fewer than ``warmup`` values
    seen) it returns 0.5 (see the module docstring for why).

    Defaults: ``window=1024`` (a few hundred feedback batches: long enough for stable ranks, short
    enough to follow the trainer as the policy improves and the loss scale moves), ``warmup=32``.

    >>> q = QuantileNormalizer(window=3, warmup=1)
    >>> q.normalize(np.array([10.0, 30.0, 20.0])).tolist()
    [0.0, 1.0, 0.5]
    >>> q.normalize(np.array([25.0])).tolist()  # window is now [30, 20, 25]
    [0.5]
    """

    def __init__(self, window: int = 1024, warmup: int = 32) -> None:
        self.window = check_int("window", window, low=2)
        self.warmup = check_int("warmup", warmup, low=0, high=self.window)
        self._values = np.zeros(0)
        self.seen = 0

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """Add ``raw`` (B,) to the window, then return each value's quantile in it, (B,)."""
        raw = check_array("raw", raw, (None,))
        self._values = np.concatenate([self._values, raw])[-self.window :]
        self.seen += raw.shape[0]
        if self.seen < self.warmup or raw.shape[0] == 0:
            return np.full(raw.shape[0], NEUTRAL)
        ordered = np.sort(self._values)
        n = ordered.shape[0]
        if n < 2:
            return np.full(raw.shape[0], NEUTRAL)
        below = np.searchsorted(ordered, raw, side="left")
        equal = np.searchsorted(ordered, raw, side="right") - below
        # A value that has slid out of the window (batch larger than the window) still gets its
        # rank against the window; equal >= 1 only holds for values inside it.
        equal = np.maximum(equal, 1)
        return np.clip((below + (equal - 1) / 2.0) / (n - 1), 0.0, 1.0)

    def state(self) -> dict[str, Any]:
        """JSON-able state: ``{"kind", "window", "warmup", "seen", "values"}``."""
        return {
            "kind": "quantile",
            "window": self.window,
            "warmup": self.warmup,
            "seen": self.seen,
            "values": [float(v) for v in self._values],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> QuantileNormalizer:
        """Rebuild from :meth:`state`; a bad entry raises ConfigError naming it.

        >>> q = QuantileNormalizer(window=8, warmup=0)
        >>> _ = q.normalize(np.array([1.0, 2.0]))
        >>> QuantileNormalizer.from_state(q.state()).normalize(np.array([1.5])).tolist()
        [0.5]
        """
        _check_kind(state, "quantile")
        out = cls(window=_get(state, "window"), warmup=_get(state, "warmup"))
        values = check_array("values", _get(state, "values"), (None,))
        if values.shape[0] > out.window:
            raise ConfigError("values", f"holds {values.shape[0]} values, window is {out.window}")
        out._values = values.copy()
        out.seen = check_int("seen", _get(state, "seen"), low=values.shape[0])
        return out


class ZScoreNormalizer:
    """Running z-score over every raw value seen (Welford/Chan batch merge, numerically stable).

    ``z = (x - mean) / std`` with the population std of all values seen so far (the batch
    included), clipped to ``[-clip, clip]``. With ``squash=True`` (default) the output is the
    normal CDF of z, a reward in [0, 1] like the quantile normaliser's (z = 0 maps to 0.5); with
    ``squash=False`` it is z itself. During warm-up (fewer than ``warmup`` values, at least 2 are
    always required for a std) it returns the neutral value: 0.5 when squashing, 0.0 otherwise.
    A zero std (all values equal) gives z = 0.

    >>> z = ZScoreNormalizer(warmup=2, squash=False)
    >>> z.normalize(np.array([1.0, 3.0])).tolist()
    [-1.0, 1.0]
    """

    def __init__(self, warmup: int = 32, clip: float = 5.0, squash: bool = True) -> None:
        self.warmup = check_int("warmup", warmup, low=0)
        self.clip = check_number("clip", clip, low=0.0, low_open=True)
        if not isinstance(squash, bool):
            raise ConfigError("squash", f"must be true or false, got {squash!r}")
        self.squash = squash
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """Add ``raw`` (B,) to the running statistics, then return each value's normalised z."""
        raw = check_array("raw", raw, (None,))
        b = raw.shape[0]
        if b:
            batch_mean = float(raw.mean())
            batch_m2 = float(((raw - batch_mean) ** 2).sum())
            total = self.count + b
            delta = batch_mean - self.mean
            self.mean += delta * b / total
            self.m2 += batch_m2 + delta**2 * self.count * b / total
            self.count = total
        neutral = NEUTRAL if self.squash else 0.0
        if self.count < max(self.warmup, 2):
            return np.full(b, neutral)
        std = math.sqrt(max(self.m2, 0.0) / self.count)
        z = np.zeros(b) if std == 0.0 else np.clip((raw - self.mean) / std, -self.clip, self.clip)
        if not self.squash:
            return z
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return np.asarray(0.5 * (1.0 + erf(z / math.sqrt(2.0))), dtype=np.float64)

    def state(self) -> dict[str, Any]:
        """JSON-able state: ``{"kind", "warmup", "clip", "squash", "count", "mean", "m2"}``."""
        return {
            "kind": "zscore",
            "warmup": self.warmup,
            "clip": self.clip,
            "squash": self.squash,
            "count": self.count,
            "mean": self.mean,
            "m2": self.m2,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ZScoreNormalizer:
        """Rebuild from :meth:`state`; a bad entry raises ConfigError naming it."""
        _check_kind(state, "zscore")
        out = cls(
            warmup=_get(state, "warmup"), clip=_get(state, "clip"), squash=_get(state, "squash")
        )
        out.count = check_int("count", _get(state, "count"), low=0)
        out.mean = check_number("mean", _get(state, "mean"))
        out.m2 = check_number("m2", _get(state, "m2"), low=0.0)
        return out


def _get(state: dict[str, Any], key: str) -> Any:
    if key not in state:
        raise ConfigError(key, "missing from normaliser state")
    return state[key]


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if not isinstance(state, dict):
        raise ConfigError("state", f"must be a dict, got {type(state).__name__}")
    if state.get("kind") != kind:
        raise ConfigError("kind", f"must be {kind!r}, got {state.get('kind')!r}")
