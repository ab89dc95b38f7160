"""The pure routing core: per-RM Gaussian posteriors, reward normalisers and routing policies.

numpy only, an injected seeded ``numpy.random.Generator``, no I/O. The math is written out in
docs/routing-core.md.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> h = with_intercept(np.array([[0.6, 0.8], [1.0, 0.0]]))
>>> policy = make_policy("bayesian", n_rms=4, dim=3, rng=rng, prior_means=np.zeros((4, 3)))
>>> selection = policy.select(h)
>>> policy.update(h, selection.chosen, np.array([1.0, 0.0]))
>>> policy.posteriors.counts.sum()
np.int64(2)
"""

from gateway.routing.baselines import (
    BestSinglePolicy,
    LaserPolicy,
    MajorityPolicy,
    OraclePolicy,
    RandomPolicy,
    UwoPolicy,
)
from gateway.routing.config import (
    DEFAULT_LAMBDA0,
    DEFAULT_SIGMA2,
    BayesianConfig,
    LaserConfig,
    UwoConfig,
    WeightedScoreConfig,
)
from gateway.routing.normalize import QuantileNormalizer, ZScoreNormalizer
from gateway.routing.policies import (
    BayesianPolicy,
    NoOfflinePolicy,
    NoOnlinePolicy,
    Policy,
    Selection,
    WeightedScorePolicy,
)
from gateway.routing.posterior import GaussianPosteriors, with_intercept
from gateway.routing.registry import POLICY_NAMES, make_policy

__all__ = [
    "DEFAULT_LAMBDA0",
    "DEFAULT_SIGMA2",
    "POLICY_NAMES",
    "BayesianConfig",
    "BayesianPolicy",
    "BestSinglePolicy",
    "GaussianPosteriors",
    "LaserConfig",
    "LaserPolicy",
    "MajorityPolicy",
    "NoOfflinePolicy",
    "NoOnlinePolicy",
    "OraclePolicy",
    "Policy",
    "QuantileNormalizer",
    "RandomPolicy",
    "Selection",
    "UwoConfig",
    "UwoPolicy",
    "WeightedScoreConfig",
    "WeightedScorePolicy",
    "ZScoreNormalizer",
    "make_policy",
    "with_intercept",
]
