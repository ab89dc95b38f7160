"""Turning the offline router into a prior the online phase can trust: calibration + evidence.

The Bradley-Terry head scores RMs on a logit scale (``s_n = h·E_n + b_n``) while the online
phase regresses rewards in [0, 1] (correctness, or quantile-normalised −DPO loss). Injecting
``E_bt`` as is makes the prior mean and the rewards disagree in scale, and with the wrong prior
strength Thompson sampling either ignores a good prior or is stuck with a bad one (measured:
see docs/replay.md). Two small fits, both on rows the router was *not* trained on, fix that:

1. :func:`calibrate_prior`: one scale ``k`` and one offset ``c`` shared by all RMs, by least
   squares of correctness on BT scores, so ``h·mu0_n = k·s_n + c`` predicts the expected reward.
   The prior mean keeps the router's direction (``mu0_n = k·[E_n; b_n] + c·e_intercept``).
2. :func:`fit_prior_strength`: ``lambda0`` and ``sigma2`` by type-II maximum likelihood
   (the marginal likelihood of the held-out rewards under the prior), over a grid. A prior that
   predicts held-out rewards well gets a large ``lambda0`` (trusted); a noisy one a small one.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> h = np.c_[rng.normal(size=(200, 3)), np.ones(200)]
>>> w = np.array([[0.2, 0.0, 0.0, 0.6], [-0.2, 0.0, 0.0, 0.4]])
>>> y = (rng.random((200, 2)) < np.clip(h @ w.T, 0, 1)).astype(float)
>>> lam, s2 = fit_prior_strength(h, y, w)
>>> bool(lam > 1.0), bool(0.1 <= s2 <= 0.3)
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reward_router.errors import ConfigError

#: Grids searched by :func:`fit_prior_strength`: lambda0 from weak (0.1) to very strong (1e4);
#: sigma2 spans the variance of a {0, 1} reward (at most 0.25) down to nearly noiseless.
LAMBDA0_GRID = tuple(float(x) for x in np.logspace(-1, 4, 21))
SIGMA2_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


@dataclass(frozen=True)
class PriorFit:
    """Calibration and strength of the injected prior, as stored with a router artifact."""

    scale: float
    offset: float
    lambda0: float
    sigma2: float

    def apply(self, raw_means: np.ndarray) -> np.ndarray:
        """Calibrated prior means from raw ``[E_n; b_n]`` rows (intercept last)."""
        return calibrated_means(raw_means, self.scale, self.offset)


def calibrate_prior(scores: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """Scale and offset mapping BT scores (P, N) to expected correctness (P, N), least squares.

    A non-positive scale (scores anti-correlated with correctness on these rows) is clipped to
    0: the prior then says "every RM equally good" and the online phase decides alone.
    """
    s, y = np.asarray(scores, float).ravel(), np.asarray(correct, float).ravel()
    if s.shape != y.shape or s.size < 2:
        raise ConfigError("scores", "need at least 2 (score, correct) pairs of equal shape")
    var = s.var()
    if var <= 0:
        return 0.0, float(y.mean())
    scale = max(float(np.mean((s - s.mean()) * (y - y.mean())) / var), 0.0)
    return scale, float(y.mean() - scale * s.mean())


def calibrated_means(raw_means: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """``scale * raw_means`` with ``offset`` added to the intercept (last) coordinate."""
    out = scale * np.asarray(raw_means, dtype=np.float64)
    out[:, -1] += offset
    return out


def log_evidence(
    contexts: np.ndarray,
    rewards: np.ndarray,
    prior_means: np.ndarray,
    lambda0: float,
    sigma2: float,
) -> float:
    """Log marginal likelihood of rewards (P, N) under w_n ~ N(mu0_n, I/lambda0), noise sigma2.

    Per RM: y ~ N(H mu0_n, sigma2 I + H H^T / lambda0); RMs are independent, so logs add up.
    """
    h = np.asarray(contexts, dtype=np.float64)
    cov = sigma2 * np.eye(len(h)) + (h @ h.T) / lambda0
    chol = np.linalg.cholesky(cov)
    logdet = 2.0 * np.log(np.diag(chol)).sum()
    resid = np.asarray(rewards, float) - h @ np.asarray(prior_means, float).T  # (P, N)
    z = np.linalg.solve(chol, resid)
    n_rms = resid.shape[1]
    return float(-0.5 * ((z**2).sum() + n_rms * (logdet + len(h) * np.log(2 * np.pi))))


def fit_prior_strength(
    contexts: np.ndarray,
    rewards: np.ndarray,
    prior_means: np.ndarray,
    lambda0_grid: tuple[float, ...] = LAMBDA0_GRID,
    sigma2_grid: tuple[float, ...] = SIGMA2_GRID,
) -> tuple[float, float]:
    """``(lambda0, sigma2)`` maximising :func:`log_evidence` over the grids."""
    if len(contexts) < 2:
        raise ConfigError("contexts", "need at least 2 held-out rows to fit the prior strength")
    best = max(
        ((lam, s2) for lam in lambda0_grid for s2 in sigma2_grid),
        key=lambda p: log_evidence(contexts, rewards, prior_means, p[0], p[1]),
    )
    return float(best[0]), float(best[1])


def fit_prior(
    contexts: np.ndarray, scores: np.ndarray, correct: np.ndarray, raw_means: np.ndarray
) -> PriorFit:
    """Calibrate ``raw_means`` on held-out rows, then fit its strength on the same rows."""
    scale, offset = calibrate_prior(scores, correct)
    means = calibrated_means(raw_means, scale, offset)
    lambda0, sigma2 = fit_prior_strength(contexts, correct, means)
    return PriorFit(scale=scale, offset=offset, lambda0=lambda0, sigma2=sigma2)
