"""``make_policy``: one table of every policy (:data:`REGISTRY`), every argument validated up front.

>>> import numpy as np
>>> policy = make_policy("uwo", n_rms=3, dim=4, rng=np.random.default_rng(0), lam=1.0)
>>> policy.name, policy.calls_per_pair
('uwo', 3.0)
>>> make_policy("bandit", n_rms=3, dim=4, rng=np.random.default_rng(0))
Traceback (most recent call last):
...
reward_router.errors.ConfigError: policy: unknown policy 'bandit'; known: bayesian, \
bayesian-paper, bayesian-no-offline, bayesian-no-online, weighted-score, laser, majority, uwo, \
random, best-single, oracle
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.routing.baselines import (
    BestSinglePolicy,
    LaserPolicy,
    MajorityPolicy,
    OraclePolicy,
    RandomPolicy,
    UwoPolicy,
)
from gateway.routing.config import (
    BayesianConfig,
    LaserConfig,
    NoOfflineConfig,
    NoParams,
    PaperConfig,
    UwoConfig,
    WeightedScoreConfig,
    build_config,
    check_array,
    check_int,
)
from gateway.routing.policies import (
    BayesianPolicy,
    NoOfflinePolicy,
    NoOnlinePolicy,
    PaperPolicy,
    Policy,
    WeightedScorePolicy,
)
from reward_router.errors import ConfigError


@dataclass(frozen=True)
class _Args:
    """What a policy's builder gets: the validated arguments of :func:`make_policy`."""

    n_rms: int
    dim: int
    rng: np.random.Generator
    config: Any
    prior_means: np.ndarray | None
    best_rm: int | None
    margin_scales: np.ndarray | None
    prior_precision: np.ndarray | None
    prior_sigma2: float | np.ndarray | None
    raw_prior_means: np.ndarray | None
    fallback: np.ndarray | None


def _best_single(a: _Args) -> Policy:
    if a.best_rm is None:
        raise ConfigError("best_rm", f"is required for 'best-single', in [0, {a.n_rms - 1}]")
    return BestSinglePolicy(a.n_rms, a.dim, a.rng, a.best_rm, a.fallback)


@dataclass(frozen=True)
class PolicySpec:
    """One row of :data:`REGISTRY`: a policy's parameters, builder and what it needs."""

    #: the config class holding the policy's tunable parameters
    config: type
    build: Callable[[_Args], Policy]
    #: its prior means come from the offline router (``prior_means`` is required)
    needs_prior: bool = False
    #: it takes the prior's raw, uncalibrated BT head (``raw_prior_means``) instead
    raw_prior: bool = False
    #: the policy that is the same without its online phase (for "gain over no-online")
    no_online: str | None = None


#: Every policy, in the order tables show them.
REGISTRY: dict[str, PolicySpec] = {
    "bayesian": PolicySpec(
        BayesianConfig,
        lambda a: BayesianPolicy(
            a.n_rms,
            a.dim,
            a.rng,
            a.prior_means,
            a.config,
            prior_precision=a.prior_precision,
            prior_sigma2=a.prior_sigma2,
        ),
        needs_prior=True,
        no_online="bayesian-no-online",
    ),
    "bayesian-paper": PolicySpec(
        PaperConfig,
        lambda a: PaperPolicy(
            a.n_rms,
            a.dim,
            a.rng,
            a.prior_means if a.raw_prior_means is None else a.raw_prior_means,
            a.config,
        ),
        needs_prior=True,
        raw_prior=True,
    ),
    "bayesian-no-offline": PolicySpec(
        NoOfflineConfig, lambda a: NoOfflinePolicy(a.n_rms, a.dim, a.rng, None, a.config)
    ),
    "bayesian-no-online": PolicySpec(
        NoParams, lambda a: NoOnlinePolicy(a.n_rms, a.dim, a.rng, a.prior_means), needs_prior=True
    ),
    "weighted-score": PolicySpec(
        WeightedScoreConfig,
        lambda a: WeightedScorePolicy(a.n_rms, a.dim, a.rng, a.prior_means, a.config),
        needs_prior=True,
    ),
    "laser": PolicySpec(LaserConfig, lambda a: LaserPolicy(a.n_rms, a.dim, a.rng, a.config)),
    "majority": PolicySpec(NoParams, lambda a: MajorityPolicy(a.n_rms, a.dim, a.rng)),
    "uwo": PolicySpec(
        UwoConfig, lambda a: UwoPolicy(a.n_rms, a.dim, a.rng, a.margin_scales, a.config)
    ),
    "random": PolicySpec(NoParams, lambda a: RandomPolicy(a.n_rms, a.dim, a.rng)),
    "best-single": PolicySpec(NoParams, _best_single),
    "oracle": PolicySpec(NoParams, lambda a: OraclePolicy(a.n_rms, a.dim, a.rng)),
}

POLICY_NAMES: tuple[str, ...] = tuple(REGISTRY)
#: Policies whose prior means come from the offline router (``prior_means`` is required).
NEEDS_PRIOR: frozenset[str] = frozenset(n for n, s in REGISTRY.items() if s.needs_prior)
#: Policies that take the prior's raw, uncalibrated BT head (``raw_prior_means``) instead.
RAW_PRIOR: frozenset[str] = frozenset(n for n, s in REGISTRY.items() if s.raw_prior)
#: name -> the policy that is the same without its online phase (for "gain over no-online").
NO_ONLINE_VARIANT: dict[str, str] = {n: s.no_online for n, s in REGISTRY.items() if s.no_online}


def make_policy(
    name: str,
    *,
    n_rms: int,
    dim: int,
    rng: np.random.Generator,
    prior_means: np.ndarray | None = None,
    best_rm: int | None = None,
    margin_scales: np.ndarray | None = None,
    prior_precision: np.ndarray | None = None,
    prior_sigma2: float | np.ndarray | None = None,
    raw_prior_means: np.ndarray | None = None,
    fallback: Sequence[int] | None = None,
    **params: Any,
) -> Policy:
    """Build the policy ``name`` (one of :data:`POLICY_NAMES`) with its ``params``.

    ``prior_means`` (n_rms, dim) is required by the policies of :data:`NEEDS_PRIOR` (ignored by
    the others, but checked when given); ``bayesian`` also takes the fitted
    ``prior_precision`` (n_rms, dim) and ``prior_sigma2`` (one label noise variance, or one
    per RM); ``bayesian-paper`` takes
    ``raw_prior_means`` (the uncalibrated BT head; ``prior_means`` when not given);
    ``best_rm`` is required by ``best-single``, whose ``fallback`` (every RM once, best
    first; default: by index after ``best_rm``) orders the others; ``margin_scales``
    (n_rms,) is used by ``uwo``.
    Any bad value raises :class:`~reward_router.errors.ConfigError` naming the field.
    """
    spec = REGISTRY.get(name)
    if spec is None:
        raise ConfigError("policy", f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    n_rms = check_int("n_rms", n_rms, low=1)
    dim = check_int("dim", dim, low=1)
    if not isinstance(rng, np.random.Generator):
        raise ConfigError("rng", f"must be a numpy.random.Generator, got {type(rng).__name__}")
    config: object = build_config(spec.config, params, name)
    if prior_means is not None:
        prior_means = check_array("prior_means", prior_means, (n_rms, dim))
    if best_rm is not None:
        best_rm = check_int("best_rm", best_rm, low=0, high=n_rms - 1)
    args = _Args(
        n_rms,
        dim,
        rng,
        config,
        prior_means,
        best_rm,
        margin_scales,
        prior_precision,
        prior_sigma2,
        raw_prior_means,
        None if fallback is None else np.asarray(fallback, dtype=np.int64),
    )
    return spec.build(args)
