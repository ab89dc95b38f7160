"""The offline prior on the correctness scale: per-RM calibration, stated strength, the link."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.routing.posterior import with_intercept
from gateway.routing.prior import (
    PAIR_SD,
    PriorFit,
    RewardLink,
    calibrate_slopes,
    fit_prior,
)
from reward_router.errors import ConfigError


def _rows(n: int, slopes: list[float], base: list[float], seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, len(slopes)))
    p = np.clip(np.array(base) + np.array(slopes) * s, 0.02, 0.98)
    return s, (rng.random(p.shape) < p).astype(float)


def test_slopes_recover_the_signal_despite_a_shared_difficulty() -> None:
    """Every RM's chance of being right moves with a pair's difficulty (shared) and with its
    own score (slope 0.12): relative calibration recovers 0.12, where shared difficulty would
    flatten an absolute one."""
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6000, 3))
    difficulty = rng.normal(0, 0.25, size=(6000, 1))
    p = np.clip(0.65 + 0.12 * s + difficulty, 0.0, 1.0)
    c = (rng.random(p.shape) < p).astype(float)
    k = calibrate_slopes(s, c)
    np.testing.assert_allclose(k, 0.12, atol=0.02)
    assert k.min() >= 0


def test_noise_scores_get_no_trust() -> None:
    rng = np.random.default_rng(1)
    s = rng.normal(size=(300, 3))
    c = (rng.random((300, 3)) < 0.6).astype(float)
    assert calibrate_slopes(s, c).max() < 0.03
    anti = calibrate_slopes(s, (s < 0).astype(float))  # anti-correlated: clipped, monotone
    assert anti.tolist() == [0.0, 0.0, 0.0]


def test_untrusted_prior_is_each_rm_at_its_accuracy() -> None:
    """A BT head with no held-out signal gives the prior 'each RM at its overall accuracy'."""
    rng = np.random.default_rng(2)
    train_s = rng.normal(size=(500, 2))
    train_c = np.c_[rng.random(500) < 0.8, rng.random(500) < 0.6].astype(float)
    calib_s = rng.normal(size=(200, 2))
    calib_c = np.c_[rng.random(200) < 0.8, rng.random(200) < 0.6].astype(float)
    fit = fit_prior(train_s, train_c, calib_s, calib_c)
    raw = np.c_[rng.normal(size=(2, 4)), [0.3, -0.2]]
    means = fit.apply(raw)
    h = with_intercept(rng.normal(size=(50, 4)) / 2)
    pred = h @ means.T
    acc = np.r_[train_c, calib_c].mean(axis=0)
    np.testing.assert_allclose(pred.mean(axis=0), acc, atol=0.03)
    assert (pred[:, 0] > pred[:, 1]).all()  # the better RM everywhere: best-single, honestly
    assert fit.weight_obs == pytest.approx(fit.sigma2 / PAIR_SD**2)


def test_prior_mean_reproduces_the_calibrated_score() -> None:
    rng = np.random.default_rng(3)
    raw = np.c_[rng.normal(size=(3, 5)), rng.normal(size=3)]
    h = with_intercept(rng.normal(size=(800, 5)) / 3)
    scores = h @ raw.T
    p = np.clip(0.6 + 0.1 * (scores - scores.mean(axis=0)), 0, 1)
    correct = (rng.random(p.shape) < p).astype(float)
    fit = fit_prior(scores[:400], correct[:400], scores[400:], correct[400:])
    rel = scores - scores.mean(axis=1, keepdims=True)
    expected = np.array(fit.intercepts) + np.array(fit.slopes) * (rel - np.array(fit.centers))
    np.testing.assert_allclose(h @ fit.apply(raw).T, expected, atol=1e-9)
    # Ranks as the BT head does when the slopes agree (they are clearly positive here).
    assert min(fit.slopes) > 0


def test_strength_is_stated_in_pseudo_observations() -> None:
    s, c = _rows(2000, [0.1, 0.1], [0.7, 0.6], seed=4)
    fit = fit_prior(s[:1500], c[:1500], s[1500:], c[1500:])
    prec = fit.precision(dim=6)
    assert prec.shape == (2, 6)
    assert fit.intercept_obs == (2000.0, 2000.0)  # what the 2000 rows measured, not capped
    np.testing.assert_allclose(prec[:, -1], 2000.0 / np.array(fit.noise))
    assert fit.noise[0] < fit.noise[1]  # the 70% RM is a quieter coin than the 60% one
    np.testing.assert_allclose(prec[:, :-1], fit.weight_obs / fit.sigma2)
    small = fit_prior(s[:40], c[:40], s[40:60], c[40:60])
    assert small.intercept_obs == (60.0, 60.0)  # what 60 rows really measured


def test_round_trip_and_version_one_artifacts() -> None:
    s, c = _rows(300, [0.1], [0.6], seed=5)
    fit = fit_prior(s[:200], c[:200], s[200:], c[200:])
    assert PriorFit.from_dict(fit.to_dict(), 1) == fit
    old = PriorFit.from_dict({"scale": 0.5, "offset": 0.25, "lambda0": 10.0, "sigma2": 0.2}, 2)
    raw = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
    np.testing.assert_allclose(old.apply(raw), [[0.5, 1.0, 1.75], [0.0, 0.5, -0.25]])
    np.testing.assert_allclose(old.precision(3), 10.0)
    with pytest.raises(ConfigError, match="intercepts"):
        PriorFit((1.0,), (0.5, 0.5), (0.0,), (1.0,), 1.0, 0.2, 0.5)
    with pytest.raises(ConfigError, match="scores"):
        calibrate_slopes(np.zeros((2, 2)), np.zeros((2, 2)))


def test_dpo_link_is_unbiased_and_weighs_less() -> None:
    """With E[u | c] = 0.5 + beta (c - c_bar), the link's estimate has mean c."""
    rng = np.random.default_rng(6)
    beta, c_bar = 0.2, 0.7
    c = (rng.random(200_000) < c_bar).astype(float)
    u = np.clip(0.5 + beta * (c - c_bar) + rng.uniform(-0.4, 0.4, c.size), 0, 1)
    link = RewardLink("dpo", informativeness=beta, center=c_bar, sigma2=0.25)
    values, weight = link.map(u)
    assert values[c == 1].mean() == pytest.approx(1.0, abs=0.02)
    assert values[c == 0].mean() == pytest.approx(0.0, abs=0.03)
    assert weight == pytest.approx(0.25 * beta**2 * 12)
    assert RewardLink("correct").map([0.0, 1.0])[1] == 1.0
    with pytest.raises(ConfigError, match="reward"):
        RewardLink("loss")
    with pytest.raises(ConfigError, match="dpo_informativeness"):
        RewardLink("dpo", informativeness=0.0)


def _two_domains(n: int, skill: list[float], seed: int) -> tuple:
    """Rows of domain a or b at random; RM 0 right with ``skill[0]`` on a and ``skill[1]`` on
    b, RM 1 the other way round. Returns (is_a, correct (n, 2), sure domain probabilities)."""
    rng = np.random.default_rng(seed)
    is_a = rng.random(n) < 0.5
    p = np.where(is_a[:, None], skill, skill[::-1])
    c = (rng.random((n, 2)) < p).astype(float)
    return is_a, c, np.stack([is_a, ~is_a], axis=1).astype(float)


def test_domain_effects_are_each_rms_accuracy_per_domain() -> None:
    # RM 0 right 0.9 on domain a and 0.3 on b, RM 1 the other way round; the domain head's
    # probabilities are sure of the domain. The prior's domain columns hold accuracy − overall.
    _, c, q = _two_domains(800, [0.9, 0.3], seed=3)
    s = np.random.default_rng(4).normal(size=(800, 2))  # BT scores that say nothing
    fit = fit_prior(s[:600], c[:600], s[600:], c[600:], train_domains=q[:600])
    effects = np.asarray(fit.domain_effects)
    overall = np.asarray(fit.intercepts)
    np.testing.assert_allclose(effects + overall[:, None], [[0.9, 0.3], [0.3, 0.9]], atol=0.06)
    np.testing.assert_allclose(np.asarray(fit.domain_obs), 300, rtol=0.15)  # its domain's rows
    # contexts [h (1 dim); q; 1]: the prior mean at a sure domain-a pair is RM 0's accuracy there
    raw = np.zeros((2, 4))
    mu = fit.apply(raw)
    ctx = np.array([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_allclose(ctx @ mu.T, [[0.9, 0.3], [0.3, 0.9]], atol=0.06)
    assert PriorFit.from_dict(fit.to_dict(), 2) == fit
    with pytest.raises(ConfigError) as info:
        fit_prior(s[:600], c[:600], s[600:], c[600:], train_domains=q[:10])
    assert info.value.field == "train_domains"
    with pytest.raises(ConfigError) as info:
        PriorFit(**{**fit.__dict__, "domain_obs": None})
    assert info.value.field == "domain_obs"


def test_slopes_calibrate_what_the_bt_score_adds_beyond_the_domain() -> None:
    """The BT scores only restate the domain (RM 0 scores high on domain a, where it is
    better): given the domain effects they add nothing, so their slopes go to 0; fitted on raw
    correctness they would count the domain twice."""
    is_a, c, q = _two_domains(2000, [0.8, 0.5], seed=5)
    rng = np.random.default_rng(6)
    s = np.where(is_a[:, None], [1.0, -1.0], [-1.0, 1.0]) + rng.normal(0, 0.3, (2000, 2))
    raw = fit_prior(s[:1000], c[:1000], s[1000:], c[1000:], train_domains=q[:1000])
    given = fit_prior(
        s[:1000], c[:1000], s[1000:], c[1000:], train_domains=q[:1000], calib_domains=q[1000:]
    )
    assert min(raw.slopes) > 0.05
    assert max(given.slopes) < 0.02
    # the domain effects themselves are the same either way
    np.testing.assert_allclose(given.domain_effects, raw.domain_effects)
    with pytest.raises(ConfigError) as info:
        fit_prior(s[:1000], c[:1000], s[1000:], c[1000:], calib_domains=q[1000:])
    assert info.value.field == "calib_domains"
    with pytest.raises(ConfigError) as info:
        fit_prior(
            s[:1000], c[:1000], s[1000:], c[1000:], train_domains=q[:1000], calib_domains=q[:5]
        )
    assert info.value.field == "calib_domains"
