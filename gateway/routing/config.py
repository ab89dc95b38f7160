"""Small validated config objects for the routing policies, and the input checks they share.

Every check fails with :class:`reward_router.errors.ConfigError` naming the field and its allowed
range, at construction time, so a bad value never reaches the math.

>>> BayesianConfig(lambda0=2.0).explore_z
2.0
>>> BayesianConfig(lambda0=0.0)
Traceback (most recent call last):
...
reward_router.errors.ConfigError: lambda0: must be a finite number in [0.001, 1e+06], got 0.0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from reward_router.errors import ConfigError

# Defaults, chosen for contexts h = [unit-norm features; 1] (so ||h||^2 ~ 2) and rewards in [0, 1].
# They are starting points; the replay evaluation tunes them (docs/routing-core.md).
#
# sigma2 = 0.25 is the largest variance a reward in [0, 1] can have (a fair coin), so the posterior
# never claims more certainty than one observation can carry.
DEFAULT_SIGMA2 = 0.25
# lambda0 = 10: the prior score h^T w has variance ||h||^2 / lambda0 ~ 0.2, a standard deviation of
# ~0.45 on the reward scale [0, 1]: wide enough to explore, narrow enough that the offline router's
# ranking (its prior-mean scores differ by a few tenths) still counts from the first pair. One
# observation adds ||h||^2 / sigma2 ~ 8 along h, so the data overrule a misleading prior after one
# or two observations in a direction. (lambda0 = 1, std ~1.4, drowned a good prior in noise on
# the replay's specialists check: 0.69 accuracy against 0.81 with 10 and 0.87 for the prior alone.)
DEFAULT_LAMBDA0 = 10.0

# Allowed range of the prior precision lambda0, the noise variance sigma2 and LASeR's ridge. The
# precision is lambda0 I + sum h h^T / sigma2; in the directions no context spans, only lambda0
# keeps it positive definite against the float rounding of the sum (which grows with the number
# of observations over sigma2). Measured with D = 33 and the same two contexts observed again
# and again (one prompt asked over and over): lambda0 = sigma2 = 1e-5 gave a precision that was
# not positive definite after 1e5 observations (every later call of the namespace failed), 1e-4
# after 1.2e6, 1e-3 was still fine after 3e6. 1e-3 is already a prior std of ~30 on a reward in
# [0, 1], or a noise std of ~0.03. Above 1e6 a prior or a noise level only says "ignore the data"
# or "ignore the prior"; larger values risk overflow.
SCALE_RANGE = (1e-3, 1e6)
# Most weight of an exploration bonus or a variance penalty (LASeR alpha, UWO lam): scores are
# O(1) rewards, so 1e6 already lets the bonus alone decide; far larger overflows to inf.
MAX_WEIGHT = 1e6


def check_number(
    field: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite number inside the interval, else raise.

    >>> check_number("alpha", 0.5, low=0.0, high=1.0)
    0.5
    >>> check_number("alpha", 2, low=0.0, high=1.0)
    Traceback (most recent call last):
    ...
    reward_router.errors.ConfigError: alpha: must be a finite number in [0, 1], got 2
    """
    left = "(" if low_open or math.isinf(low) else "["
    right = ")" if high_open or math.isinf(high) else "]"
    interval = f"{left}{_fmt(low)}, {_fmt(high)}{right}"
    # bool is an int subclass; True as a prior strength is a bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(field, f"must be a finite number in {interval}, got {value!r}")
    number = float(value)
    inside = (
        math.isfinite(number)
        and (number > low if low_open else number >= low)
        and (number < high if high_open else number <= high)
    )
    if not inside:
        raise ConfigError(field, f"must be a finite number in {interval}, got {value!r}")
    return number


def check_int(field: str, value: object, *, low: int, high: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer in ``[low, high]`` (``high`` inclusive)."""
    top = "inf)" if high is None else f"{high}]"
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(field, f"must be an integer in [{low}, {top}, got {value!r}")
    number = int(value)
    if number < low or (high is not None and number > high):
        raise ConfigError(field, f"must be an integer in [{low}, {top}, got {value!r}")
    return number


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:g}"


def check_array(
    field: str,
    value: object,
    shape: tuple[int | None, ...],
    *,
    dtype: type = np.float64,
) -> np.ndarray:
    """Return ``value`` as an array of ``shape`` (None = any length) with finite entries.

    >>> check_array("rewards", [0.0, 1.0], (None,)).shape
    (2,)
    >>> check_array("rewards", [0.0, float("nan")], (None,))
    Traceback (most recent call last):
    ...
    reward_router.errors.ConfigError: rewards: must be finite, found 1 NaN/inf entries
    """
    try:
        array: np.ndarray = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ConfigError(field, f"must be a numeric array, got {type(value).__name__}") from exc
    # Free axes print as B (the batch) for axis 0 and ? elsewhere.
    wanted = "(" + ", ".join(_axis(i, s) for i, s in enumerate(shape)) + ")"
    if array.ndim != len(shape) or any(
        s is not None and s != got for s, got in zip(shape, array.shape, strict=True)
    ):
        raise ConfigError(field, f"must have shape {wanted}, got {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ConfigError(field, f"must be finite, found {bad} NaN/inf entries")
    return array


def _axis(i: int, size: int | None) -> str:
    if size is not None:
        return str(size)
    return "B" if i == 0 else "?"


def check_arms(field: str, arms: object, n_rms: int, length: int) -> np.ndarray:
    """Return ``arms`` as an int64 array of ``length`` RM indices in ``[0, n_rms)``."""
    array = np.asarray(arms)
    if array.ndim != 1 or array.shape[0] != length:
        raise ConfigError(field, f"must have shape ({length},), got {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(field, f"must be integer RM indices, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= n_rms):
        raise ConfigError(field, f"must be RM indices in [0, {n_rms - 1}], got {array.tolist()}")
    return array


# --------------------------------------------------------------------------------------------
# Policy configs


@dataclass(frozen=True)
class BayesianConfig:
    """Parameters of the Bayesian linear Thompson-sampling router.

    ``lambda0``: isotropic prior precision (prior covariance I / lambda0), in [1e-3, 1e6];
    ``None`` (the default) takes the router's fitted prior precision (its strength stated as
    pseudo-observations, :mod:`gateway.routing.prior`), or :data:`DEFAULT_LAMBDA0` without one.
    ``sigma2``: observation noise variance of a reward, in [1e-3, 1e6]; ``None`` takes the
    router's fitted label variance, or :data:`DEFAULT_SIGMA2`.
    ``forgetting``: per-observation factor gamma in (0, 1] pulling the posterior back toward the
    prior (1 = off, the default; anything below 1 makes updates order-dependent).
    ``forget_obs``: with forgetting on, the strength the posterior decays toward is the prior's
    capped at this many pseudo-observations per coordinate. ``None`` (the default) is the
    forgetting's own memory, ``1 / (1 - forgetting)`` observations: evidence older than that is
    forgotten, and the prior is old evidence too. A prior fitted on thousands of rows is worth
    them on a stationary stream, but must not outweigh a drifted RM's last rewards.
    ``explore_z``: with forgetting on, an RM is drawn for a pair only if its score could still
    beat the leader's: ``mean_n + z * sd(mean_n - mean_leader) >= mean_leader`` (the leader has
    the highest posterior mean). 2.0 by default (explore what has at least a ~2% chance of being
    better); ``None`` is plain Thompson sampling over every RM, as in the paper.
    ``stationary_z``: the same gate with forgetting off (the default): 0.0 by default, the
    leader by posterior mean, whose rewards still update it. On a stationary stream the prior
    is worth its rows, and separating two RMs ``gap`` apart takes ~``sigma2 / gap²`` labels of
    each: exploring close RMs cost accuracy on every shipped matrix and never paid back
    (``docs/routing-core.md``). Under forgetting the posterior keeps widening, and exploring is
    what finds the RM that overtook a drifted leader.

    >>> BayesianConfig(forgetting=0.99).forgetting
    0.99
    >>> BayesianConfig().lambda0 is None, BayesianConfig(sigma2=0.2).sigma2
    (True, 0.2)
    """

    lambda0: float | None = None
    sigma2: float | None = None
    forgetting: float = 1.0
    explore_z: float | None = 2.0
    explore_ramp: float = 500.0
    forget_obs: float | None = None
    stationary_z: float | None = 0.0

    def __post_init__(self) -> None:
        low, high = SCALE_RANGE
        for name in ("lambda0", "sigma2"):
            if getattr(self, name) is not None:
                _set(self, name, check_number(name, getattr(self, name), low=low, high=high))
        _set(
            self,
            "forgetting",
            check_number("forgetting", self.forgetting, low=0.0, high=1.0, low_open=True),
        )
        for name in ("explore_z", "stationary_z"):
            if getattr(self, name) is not None:
                _set(self, name, check_number(name, getattr(self, name), low=0.0, high=100.0))
        _set(
            self,
            "explore_ramp",
            check_number("explore_ramp", self.explore_ramp, low=0.0, high=1e9),
        )
        if self.forget_obs is not None:
            _set(
                self,
                "forget_obs",
                check_number("forget_obs", self.forget_obs, low=0.0, high=1e9, low_open=True),
            )

    @property
    def gate_z(self) -> float | None:
        """The plausibility gate in force: ``explore_z`` with forgetting on, else
        ``stationary_z`` (``None``: plain Thompson sampling).

        >>> BayesianConfig().gate_z, BayesianConfig(forgetting=0.99).gate_z
        (0.0, 2.0)
        """
        return self.explore_z if self.forgetting < 1.0 else self.stationary_z

    @property
    def memory(self) -> float:
        """What forgetting decays the prior toward, in observations: ``forget_obs``, else
        ``1 / (1 - forgetting)`` (infinite without forgetting).

        >>> round(BayesianConfig(forgetting=0.98).memory, 6), BayesianConfig().memory
        (50.0, inf)
        >>> BayesianConfig(forgetting=0.98, forget_obs=500).memory
        500.0
        """
        if self.forget_obs is not None:
            return self.forget_obs
        return math.inf if self.forgetting >= 1.0 else 1.0 / (1.0 - self.forgetting)

    @property
    def noise(self) -> float:
        """``sigma2``, or the default when unset (an unfitted prior)."""
        return DEFAULT_SIGMA2 if self.sigma2 is None else self.sigma2


@dataclass(frozen=True)
class NoOfflineConfig(BayesianConfig):
    """``bayesian-no-offline``: plain Thompson sampling from a zero prior (no prior knowledge
    for the gate or the ramp to protect).

    >>> NoOfflineConfig().explore_z, NoOfflineConfig().explore_ramp
    (None, 0.0)
    """

    explore_z: float | None = None
    stationary_z: float | None = None
    explore_ramp: float = 0.0


@dataclass(frozen=True)
class PaperConfig(BayesianConfig):
    """The ``bayesian-paper`` preset: hand-set strength, plain Thompson sampling. The paper
    hand-sets lambda0 and sigma2; these are the project's historical defaults (lambda0 = 10:
    prior score sd ~0.45 on [0, 1] rewards; sigma2 = 0.25, a fair coin's variance).

    >>> PaperConfig().lambda0, PaperConfig().sigma2, PaperConfig().explore_z
    (10.0, 0.25, None)
    >>> PaperConfig().explore_ramp
    0.0
    """

    lambda0: float | None = DEFAULT_LAMBDA0
    sigma2: float | None = DEFAULT_SIGMA2
    explore_z: float | None = None
    stationary_z: float | None = None
    explore_ramp: float = 0.0


@dataclass(frozen=True)
class WeightedScoreConfig(BayesianConfig):
    """The ``weighted-score`` ablation: ``alpha * offline + (1 - alpha) * online`` scores.

    ``alpha`` in [0, 1] weighs the offline score h^T mu0_n; the online part is a Thompson draw
    from a zero-prior posterior with ``lambda0``/``sigma2``/``forgetting`` as in
    :class:`BayesianConfig`.

    >>> WeightedScoreConfig(alpha=0.3).alpha
    0.3
    """

    alpha: float = 0.5
    # The online part is plain Thompson sampling from a zero prior (nothing to gate or ramp).
    explore_z: float | None = None
    stationary_z: float | None = None
    explore_ramp: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "alpha", check_number("alpha", self.alpha, low=0.0, high=1.0))


@dataclass(frozen=True)
class LaserConfig:
    """LASeR (batch-level LinUCB): ``alpha`` in [0, 1e6] scales the exploration bonus, ``ridge``
    in [1e-3, 1e6] is the ridge penalty (the initial design matrix is ``ridge * I``; a tiny one
    leaves it singular).

    >>> LaserConfig(alpha=0.5).ridge
    1.0
    """

    alpha: float = 1.0
    ridge: float = 1.0

    def __post_init__(self) -> None:
        _set(self, "alpha", check_number("alpha", self.alpha, low=0.0, high=MAX_WEIGHT))
        low, high = SCALE_RANGE
        _set(self, "ridge", check_number("ridge", self.ridge, low=low, high=high))


@dataclass(frozen=True)
class UwoConfig:
    """Uncertainty-weighted optimisation: ``lam`` in [0, 1e6] weighs the variance penalty.

    >>> UwoConfig().lam
    0.5
    """

    lam: float = 0.5

    def __post_init__(self) -> None:
        _set(self, "lam", check_number("lam", self.lam, low=0.0, high=MAX_WEIGHT))


@dataclass(frozen=True)
class NoParams:
    """Config of a policy without tunable parameters (random, majority, oracle, ...)."""


ConfigT = TypeVar("ConfigT")


def build_config(cls: type[ConfigT], params: Mapping[str, Any], policy: str) -> ConfigT:
    """Build ``cls(**params)``, turning an unknown parameter into a ConfigError naming it.

    >>> build_config(UwoConfig, {"lam": 1.0}, "uwo")
    UwoConfig(lam=1.0)
    >>> build_config(UwoConfig, {"lamda": 1.0}, "uwo")
    Traceback (most recent call last):
    ...
    reward_router.errors.ConfigError: lamda: unknown parameter for policy 'uwo'; allowed: ['lam']
    """
    allowed = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in params:
        if key not in allowed:
            raise ConfigError(key, f"unknown parameter for policy {policy!r}; allowed: {allowed}")
    return cls(**params)


def _set(obj: object, name: str, value: object) -> None:
    # Frozen dataclasses normalise their fields (e.g. int -> float) through object.__setattr__.
    object.__setattr__(obj, name, value)
