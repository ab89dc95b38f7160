"""Calibrating the offline prior onto the reward scale and fitting its strength by evidence."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.routing.posterior import with_intercept
from gateway.routing.prior import (
    calibrate_prior,
    calibrated_means,
    fit_prior,
    fit_prior_strength,
    log_evidence,
)
from reward_router.errors import ConfigError


def test_calibration_recovers_scale_and_offset() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(500, 3))
    correct = 0.1 * scores + 0.6 + rng.normal(0, 0.01, scores.shape)
    scale, offset = calibrate_prior(scores, correct)
    assert scale == pytest.approx(0.1, abs=0.005)
    assert offset == pytest.approx(0.6, abs=0.005)


def test_anti_correlated_scores_give_a_flat_prior() -> None:
    scores = np.array([[1.0, -1.0], [2.0, -2.0]])
    correct = np.array([[0.0, 1.0], [0.0, 1.0]])
    scale, offset = calibrate_prior(scores, correct)
    assert scale == 0.0 and offset == pytest.approx(0.5)


def test_calibrated_means_shift_only_the_intercept() -> None:
    raw = np.array([[1.0, 2.0, 3.0]])
    assert calibrated_means(raw, 0.5, 0.25).tolist() == [[0.5, 1.0, 1.75]]


def test_log_evidence_matches_the_gaussian_density() -> None:
    rng = np.random.default_rng(1)
    h = with_intercept(rng.normal(size=(6, 2)))
    y = rng.random((6, 2))
    mu0 = rng.normal(size=(2, 3))
    lam, s2 = 3.0, 0.2
    cov = s2 * np.eye(6) + h @ h.T / lam
    expected = 0.0
    for n in range(2):
        r = y[:, n] - h @ mu0[n]
        _, logdet = np.linalg.slogdet(cov)
        expected += -0.5 * (r @ np.linalg.solve(cov, r) + logdet + 6 * np.log(2 * np.pi))
    assert log_evidence(h, y, mu0, lam, s2) == pytest.approx(expected, rel=1e-10)


def test_a_right_prior_is_trusted_more_than_a_wrong_one() -> None:
    rng = np.random.default_rng(2)
    h = with_intercept(rng.normal(size=(300, 4)) / 2)
    w = rng.normal(0, 0.3, size=(3, 5))
    y = h @ w.T + rng.normal(0, 0.2, (300, 3))
    lam_right, s2 = fit_prior_strength(h, y, w)
    lam_wrong, _ = fit_prior_strength(h, y, -w)
    assert lam_right > 10 * lam_wrong
    assert s2 == pytest.approx(0.05, abs=0.03)  # noise variance 0.04, nearest grid point 0.05


def test_fit_prior_end_to_end_and_bad_input() -> None:
    rng = np.random.default_rng(3)
    h = with_intercept(rng.normal(size=(100, 2)))
    raw = np.array([[1.0, 0.0, 0.5], [-1.0, 0.0, 0.0]])
    scores = h @ raw.T
    correct = (rng.random((100, 2)) < 1 / (1 + np.exp(-scores))).astype(float)
    fit = fit_prior(h, scores, correct, raw)
    assert fit.scale > 0 and fit.lambda0 > 0 and fit.sigma2 > 0
    assert np.allclose(fit.apply(raw), calibrated_means(raw, fit.scale, fit.offset))
    with pytest.raises(ConfigError, match="contexts"):
        fit_prior_strength(h[:1], correct[:1], raw)
