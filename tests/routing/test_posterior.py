"""GaussianPosteriors against closed-form Bayesian linear regression, computed directly here."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.routing import GaussianPosteriors, with_intercept
from reward_router.errors import ConfigError


def closed_form(
    prior_mean: np.ndarray, lambda0: float, x: np.ndarray, y: np.ndarray, sigma2: float
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and covariance of w for y = X w + N(0, sigma2), w ~ N(m0, I / lambda0)."""
    d = prior_mean.shape[0]
    cov = np.linalg.inv(lambda0 * np.eye(d) + x.T @ x / sigma2)
    mean = cov @ (lambda0 * prior_mean + x.T @ y / sigma2)
    return mean, cov


def random_problem(seed: int, n_rms: int = 3, d: int = 4, b: int = 30):
    rng = np.random.default_rng(seed)
    prior = rng.normal(size=(n_rms, d))
    contexts = with_intercept(rng.normal(size=(b, d - 1)))
    arms = rng.integers(0, n_rms, size=b)
    rewards = rng.random(b)
    return prior, contexts, arms, rewards


def test_with_intercept_appends_a_constant_one_column() -> None:
    h = with_intercept(np.array([[0.6, 0.8], [1.0, 0.0]]))
    assert h.shape == (2, 3)
    assert h[:, -1].tolist() == [1.0, 1.0]
    assert h[:, :2].tolist() == [[0.6, 0.8], [1.0, 0.0]]


@pytest.mark.parametrize("lambda0,sigma2", [(1.0, 0.25), (3.0, 1.0), (0.1, 0.05)])
def test_posterior_matches_closed_form(lambda0: float, sigma2: float) -> None:
    prior, contexts, arms, rewards = random_problem(seed=1)
    post = GaussianPosteriors.from_prior(prior, lambda0)
    post.observe(arms, contexts, rewards, sigma2)
    means, covs = post.means(), post.covariances()
    probe = with_intercept(np.random.default_rng(2).normal(size=(5, 3)))
    for n in range(prior.shape[0]):
        rows = arms == n
        mean, cov = closed_form(prior[n], lambda0, contexts[rows], rewards[rows], sigma2)
        np.testing.assert_allclose(means[n], mean, rtol=0, atol=1e-10)
        np.testing.assert_allclose(covs[n], cov, rtol=0, atol=1e-10)
        np.testing.assert_allclose(post.covariance_diagonals()[n], np.diag(cov), atol=1e-10)
        np.testing.assert_allclose(post.mean_scores(probe)[:, n], probe @ mean, atol=1e-10)
        exact_var = np.einsum("bi,ij,bj->b", probe, cov, probe)
        np.testing.assert_allclose(post.variances(probe)[:, n], exact_var, rtol=1e-9, atol=0)
    assert post.counts.tolist() == [int((arms == n).sum()) for n in range(3)]


def test_natural_parameters_follow_the_documented_update() -> None:
    prior, contexts, arms, rewards = random_problem(seed=3, b=5)
    post = GaussianPosteriors.from_prior(prior, lambda0=2.0)
    np.testing.assert_array_equal(post.prior_precision, np.broadcast_to(2 * np.eye(4), (3, 4, 4)))
    np.testing.assert_array_equal(post.eta, 2.0 * prior)
    post.observe(arms, contexts, rewards, sigma2=0.5)
    expected_precision = post.prior_precision.copy()
    expected_eta = 2.0 * prior
    for a, h, r in zip(arms, contexts, rewards, strict=True):
        expected_precision[a] += np.outer(h, h) / 0.5
        expected_eta[a] += r * h / 0.5
    np.testing.assert_allclose(post.precision, expected_precision, atol=1e-12)
    np.testing.assert_allclose(post.eta, expected_eta, atol=1e-12)
    np.testing.assert_array_equal(post.prior_eta, 2.0 * prior)


def test_any_order_and_batching_gives_the_same_posterior() -> None:
    prior, contexts, arms, rewards = random_problem(seed=4, b=60)
    whole = GaussianPosteriors.from_prior(prior, lambda0=1.0)
    whole.observe(arms, contexts, rewards, sigma2=0.25)
    rng = np.random.default_rng(5)
    for _ in range(5):
        order = rng.permutation(60)
        cuts = np.sort(rng.choice(np.arange(1, 60), size=rng.integers(1, 10), replace=False))
        pieces = GaussianPosteriors.from_prior(prior, lambda0=1.0)
        for chunk in np.split(order, cuts):
            pieces.observe(arms[chunk], contexts[chunk], rewards[chunk], sigma2=0.25)
        np.testing.assert_allclose(pieces.precision, whole.precision, rtol=0, atol=1e-9)
        np.testing.assert_allclose(pieces.eta, whole.eta, rtol=0, atol=1e-9)
        np.testing.assert_allclose(pieces.means(), whole.means(), rtol=0, atol=1e-9)
        assert pieces.counts.tolist() == whole.counts.tolist()


def test_cached_factors_are_refreshed_after_each_update() -> None:
    prior, contexts, arms, rewards = random_problem(seed=6, b=20)
    post = GaussianPosteriors.from_prior(prior, lambda0=1.0)
    for i in range(0, 20, 4):
        before = post.means()
        post.observe(arms[i : i + 4], contexts[i : i + 4], rewards[i : i + 4], sigma2=0.25)
        fresh = GaussianPosteriors.from_arrays(post.to_arrays())  # no cache carried over
        np.testing.assert_allclose(post.means(), fresh.means(), atol=1e-12)
        touched = np.unique(arms[i : i + 4])
        untouched = np.setdiff1d(np.arange(3), touched)
        assert not np.allclose(post.means()[touched], before[touched])
        np.testing.assert_array_equal(post.means()[untouched], before[untouched])


def test_sampling_is_reproducible_with_a_fixed_seed() -> None:
    prior, contexts, arms, rewards = random_problem(seed=7)
    post = GaussianPosteriors.from_prior(prior, lambda0=1.0)
    post.observe(arms, contexts, rewards, sigma2=0.25)
    a = post.sample_scores(contexts, np.random.default_rng(11))
    b = post.sample_scores(contexts, np.random.default_rng(11))
    c = post.sample_scores(contexts, np.random.default_rng(12))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_one_dimensional_draw_matches_the_full_multivariate_draw() -> None:
    """h^T w with w ~ N(mu, Sigma) drawn in full vs the exact 1-D draw, same mean and variance.

    With n = 200_000 draws the standard error of a sample mean is sqrt(v / n) and that of a sample
    variance about v * sqrt(2 / n) (normal data); 5 standard errors keeps a false failure below
    1e-6 while still catching a variance off by 2% or a mean shifted by a hundredth of a std.
    """
    prior, contexts, arms, rewards = random_problem(seed=8, n_rms=2, d=5, b=12)
    post = GaussianPosteriors.from_prior(prior, lambda0=1.0)
    post.observe(arms, contexts, rewards, sigma2=0.25)
    h = with_intercept(np.array([[0.3, -0.5, 0.2, 0.8]]))
    n = 200_000
    exact_mean = post.mean_scores(h)[0]
    exact_var = post.variances(h)[0]
    one_d = post.sample_scores(np.repeat(h, n, axis=0), np.random.default_rng(21))
    rng = np.random.default_rng(22)
    means, covs = post.means(), post.covariances()
    for arm in range(2):
        full = rng.multivariate_normal(means[arm], covs[arm], size=n) @ h[0]
        for draws in (one_d[:, arm], full):
            se_mean = np.sqrt(exact_var[arm] / n)
            se_var = exact_var[arm] * np.sqrt(2.0 / n)
            assert abs(draws.mean() - exact_mean[arm]) < 5 * se_mean
            assert abs(draws.var() - exact_var[arm]) < 5 * se_var
        # the two samplers against each other: difference of two independent estimates
        assert abs(one_d[:, arm].mean() - full.mean()) < 5 * np.sqrt(2) * se_mean
        assert abs(one_d[:, arm].var() - full.var()) < 5 * np.sqrt(2) * se_var


def test_forgetting_pulls_toward_the_prior() -> None:
    prior, contexts, arms, rewards = random_problem(seed=9, b=40)
    post = GaussianPosteriors.from_prior(prior, lambda0=1.0)
    post.observe(arms, contexts, rewards, sigma2=0.25)
    distance = np.linalg.norm(post.means() - prior)
    trace = np.trace(post.precision, axis1=1, axis2=2).sum()
    for _ in range(60):
        post.forget(0.8)
        new_distance = np.linalg.norm(post.means() - prior)
        new_trace = np.trace(post.precision, axis1=1, axis2=2).sum()
        assert new_distance < distance
        assert new_trace < trace
        distance, trace = new_distance, new_trace
    assert distance < 1e-2
    np.testing.assert_allclose(post.precision, post.prior_precision, atol=0.05)
    counts = post.counts.copy()
    post.forget(1.0)  # the default: a no-op
    assert post.counts.tolist() == counts.tolist()
    assert np.linalg.norm(post.means() - prior) == pytest.approx(distance, abs=1e-15)


def test_forgetting_decays_toward_a_floor_weaker_than_the_prior() -> None:
    prior, contexts, arms, rewards = random_problem(seed=12, b=40)
    post = GaussianPosteriors.from_prior(prior, lambda0=100.0)
    post.observe(arms, contexts, rewards, sigma2=0.25)
    floor = np.full(post.prior_diag.shape, 4.0)
    for _ in range(200):
        post.forget(0.8, floor)
    # the prior's mean, at the floor's strength: N(mu0, diag(floor)^-1)
    np.testing.assert_allclose(post.means(), prior, atol=1e-6)
    np.testing.assert_allclose(
        post.precision, np.broadcast_to(4.0 * np.eye(post.dim), post.precision.shape), atol=1e-6
    )
    with pytest.raises(ConfigError) as info:
        post.forget(0.5, np.zeros_like(floor))
    assert info.value.field == "floor"
    with pytest.raises(ConfigError) as info:
        post.forget(0.5, np.ones(3))
    assert info.value.field == "floor"


def test_forgetting_makes_the_order_of_updates_matter() -> None:
    prior, contexts, arms, rewards = random_problem(seed=10, b=2)
    arms = np.array([0, 0])
    ab = GaussianPosteriors.from_prior(prior, lambda0=1.0)
    ba = GaussianPosteriors.from_prior(prior, lambda0=1.0)
    for post, order in ((ab, [0, 1]), (ba, [1, 0])):
        for i in order:
            post.forget(0.5)
            post.observe(arms[i : i + 1], contexts[i : i + 1], rewards[i : i + 1], sigma2=0.25)
    assert not np.allclose(ab.means(), ba.means())


def test_arrays_round_trip() -> None:
    prior, contexts, arms, rewards = random_problem(seed=11)
    post = GaussianPosteriors.from_prior(prior, lambda0=1.5)
    post.observe(arms, contexts, rewards, sigma2=0.25)
    arrays = post.to_arrays()
    assert set(arrays) == {"precision", "eta", "prior_eta", "lambda0", "counts", "prior_diag"}
    back = GaussianPosteriors.from_arrays(arrays)
    assert back == post
    assert back.lambda0 == 1.5
    np.testing.assert_array_equal(back.means(), post.means())
    np.testing.assert_array_equal(
        back.sample_scores(contexts, np.random.default_rng(3)),
        post.sample_scores(contexts, np.random.default_rng(3)),
    )
    # A snapshot written before the diagonal prior existed loads as lambda0 everywhere.
    del arrays["prior_diag"]
    assert GaussianPosteriors.from_arrays(arrays) == post
    arrays["eta"][0, 0] += 1.0  # to_arrays hands out copies
    assert GaussianPosteriors.from_arrays(post.to_arrays()) == post
    back.observe(arms[:3], contexts[:3], rewards[:3], sigma2=0.25)
    assert back != post


@pytest.mark.parametrize("missing", ["precision", "eta", "prior_eta", "lambda0", "counts"])
def test_from_arrays_names_a_missing_key(missing: str) -> None:
    arrays = GaussianPosteriors.from_prior(np.zeros((2, 3)), lambda0=1.0).to_arrays()
    del arrays[missing]
    with pytest.raises(ConfigError, match=missing) as info:
        GaussianPosteriors.from_arrays(arrays)
    assert info.value.field == missing


def test_bad_posterior_inputs_name_the_field() -> None:
    post = GaussianPosteriors.from_prior(np.zeros((2, 3)), lambda0=1.0)
    h = np.ones((2, 3))
    cases = [
        (lambda: post.observe(np.array([0, 1]), h, np.array([0.0, np.nan]), 0.25), "rewards"),
        (lambda: post.observe(np.array([0, 2]), h, np.zeros(2), 0.25), "arms"),
        (lambda: post.observe(np.array([0, 1]), h, np.zeros(2), 0.0), "sigma2"),
        (lambda: post.mean_scores(np.ones((2, 4))), "contexts"),
        (lambda: post.variances(np.array([[1.0, np.inf, 0.0]])), "contexts"),
        (lambda: post.forget(1.5), "forgetting"),
        (lambda: GaussianPosteriors.from_prior(np.zeros((2, 3)), lambda0=-1.0), "lambda0"),
        (lambda: GaussianPosteriors.from_prior(None, lambda0=1.0, dim=3), "prior_means"),
    ]
    for call, field in cases:
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.field == field
