"""``make_policy``: policy name -> class table, with every argument validated up front.

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

POLICY_NAMES: tuple[str, ...] = (
    "bayesian",
    "bayesian-paper",
    "bayesian-no-offline",
    "bayesian-no-online",
    "weighted-score",
    "laser",
    "majority",
    "uwo",
    "random",
    "best-single",
    "oracle",
)

#: Policies whose prior means come from the offline router (``prior_means`` is required).
NEEDS_PRIOR: frozenset[str] = frozenset(
    {"bayesian", "bayesian-paper", "bayesian-no-online", "weighted-score"}
)
#: Policies that take the prior's raw, uncalibrated BT head (``raw_prior_means``) instead.
RAW_PRIOR: frozenset[str] = frozenset({"bayesian-paper"})
#: name -> the policy that is the same without its online phase (for "gain over no-online").
NO_ONLINE_VARIANT: dict[str, str] = {"bayesian": "bayesian-no-online"}

# name -> the config class holding that policy's tunable parameters
CONFIGS: dict[str, type] = {
    "bayesian": BayesianConfig,
    "bayesian-paper": PaperConfig,
    "bayesian-no-offline": NoOfflineConfig,
    "bayesian-no-online": NoParams,
    "weighted-score": WeightedScoreConfig,
    "laser": LaserConfig,
    "majority": NoParams,
    "uwo": UwoConfig,
    "random": NoParams,
    "best-single": NoParams,
    "oracle": NoParams,
}


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
    **params: Any,
) -> Policy:
    """Build the policy ``name`` (one of :data:`POLICY_NAMES`) with its ``params``.

    ``prior_means`` (n_rms, dim) is required by the policies of :data:`NEEDS_PRIOR` (ignored by
    the others, but checked when given); ``bayesian`` also takes the fitted
    ``prior_precision`` (n_rms, dim) and ``prior_sigma2`` (one label noise variance, or one
    per RM); ``bayesian-paper`` takes
    ``raw_prior_means`` (the uncalibrated BT head; ``prior_means`` when not given);
    ``best_rm`` is required by ``best-single``; ``margin_scales`` (n_rms,) is used by ``uwo``.
    Any bad value raises :class:`~reward_router.errors.ConfigError` naming the field.
    """
    if name not in CONFIGS:
        raise ConfigError("policy", f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    n_rms = check_int("n_rms", n_rms, low=1)
    dim = check_int("dim", dim, low=1)
    if not isinstance(rng, np.random.Generator):
        raise ConfigError("rng", f"must be a numpy.random.Generator, got {type(rng).__name__}")
    config: object = build_config(CONFIGS[name], params, name)
    if prior_means is not None:
        prior_means = check_array("prior_means", prior_means, (n_rms, dim))
    if best_rm is not None:
        best_rm = check_int("best_rm", best_rm, low=0, high=n_rms - 1)

    if name == "bayesian":
        assert isinstance(config, BayesianConfig)
        return BayesianPolicy(
            n_rms,
            dim,
            rng,
            prior_means,
            config,
            prior_precision=prior_precision,
            prior_sigma2=prior_sigma2,
        )
    if name == "bayesian-paper":
        assert isinstance(config, PaperConfig)
        raw = prior_means if raw_prior_means is None else raw_prior_means
        return PaperPolicy(n_rms, dim, rng, raw, config)
    if name == "bayesian-no-offline":
        assert isinstance(config, BayesianConfig)
        return NoOfflinePolicy(n_rms, dim, rng, None, config)
    if name == "bayesian-no-online":
        return NoOnlinePolicy(n_rms, dim, rng, prior_means)
    if name == "weighted-score":
        assert isinstance(config, WeightedScoreConfig)
        return WeightedScorePolicy(n_rms, dim, rng, prior_means, config)
    if name == "laser":
        assert isinstance(config, LaserConfig)
        return LaserPolicy(n_rms, dim, rng, config)
    if name == "uwo":
        assert isinstance(config, UwoConfig)
        return UwoPolicy(n_rms, dim, rng, margin_scales, config)
    if name == "best-single":
        if best_rm is None:
            raise ConfigError("best_rm", f"is required for 'best-single', in [0, {n_rms - 1}]")
        return BestSinglePolicy(n_rms, dim, rng, best_rm)
    simple: dict[str, type[Policy]] = {
        "majority": MajorityPolicy,
        "random": RandomPolicy,
        "oracle": OraclePolicy,
    }
    return simple[name](n_rms, dim, rng)
