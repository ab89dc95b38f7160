"""Every policy behind the Policy interface: selections, rankings, learning, combine, configs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gateway.routing import (
    DEFAULT_LAMBDA0,
    DEFAULT_SIGMA2,
    POLICY_NAMES,
    BayesianConfig,
    BayesianPolicy,
    GaussianPosteriors,
    LaserPolicy,
    Policy,
    make_policy,
    with_intercept,
)
from gateway.routing.policies import askable_mask, reference_last
from reward_router.errors import ConfigError

N, D = 4, 6
SINGLE = {
    "bayesian",
    "bayesian-paper",
    "bayesian-no-offline",
    "bayesian-no-online",
    "weighted-score",
    "laser",
}
SINGLE |= {"random", "best-single"}
LEARNING = {"bayesian", "bayesian-paper", "bayesian-no-offline", "weighted-score", "laser"}


def prior() -> np.ndarray:
    return np.random.default_rng(100).normal(size=(N, D))


def contexts(seed: int, b: int = 10) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(b, D - 1))
    return with_intercept(x / np.linalg.norm(x, axis=1, keepdims=True))


def build(name: str, seed: int = 0, **params: Any) -> Policy:
    return make_policy(
        name,
        n_rms=N,
        dim=D,
        rng=np.random.default_rng(seed),
        prior_means=prior(),
        best_rm=2,
        **params,
    )


def build_bayes(name: str = "bayesian", seed: int = 0, **params: Any) -> BayesianPolicy:
    policy = build(name, seed, **params)
    assert isinstance(policy, BayesianPolicy)
    return policy


def run_stream(policy: Policy, steps: int = 6) -> list[np.ndarray]:
    """select/update over a fixed stream; returns the rankings."""
    rankings = []
    for step in range(steps):
        h = contexts(step)
        selection = policy.select(h)
        rankings.append(selection.ranking)
        rewards = (h[:, 0] > 0).astype(float)  # any fixed function of the context
        policy.update(h, selection.chosen, rewards)
    return rankings


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_selection_shape_and_flags(name: str) -> None:
    policy = build(name)
    selection = policy.select(contexts(1))
    assert policy.name == name
    assert policy.n_rms == N
    assert selection.ranking.shape == (10, N)
    assert np.issubdtype(selection.ranking.dtype, np.integer)
    assert (np.sort(selection.ranking, axis=1) == np.arange(N)).all(), "rows are permutations"
    assert selection.asked.dtype == bool
    if name in SINGLE:
        assert policy.calls_per_pair == 1.0
        assert selection.asked.sum(axis=1).tolist() == [1] * 10
        assert selection.asked[np.arange(10), selection.chosen].all()
    else:
        assert policy.calls_per_pair == float(N)
        assert selection.asked.all()
    assert policy.requires_labels == (name == "oracle")
    assert policy.learns_online == (name in LEARNING)
    empty = policy.select(np.zeros((0, D)))
    assert empty.ranking.shape == (0, N)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_a_fixed_seed_reproduces_the_choices(name: str) -> None:
    first = run_stream(build(name, seed=3))
    again = run_stream(build(name, seed=3))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    if name in {"random", "bayesian-no-offline", "weighted-score"}:
        other = run_stream(build(name, seed=4))
        assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    if name == "bayesian":  # without forgetting it asks the leader by posterior mean: no draw
        other = run_stream(build(name, seed=4))
        assert all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
        drawn = run_stream(build(name, seed=4, stationary_z=2.0))
        assert any(not np.array_equal(a, b) for a, b in zip(first, drawn, strict=True))


def test_random_ranking_is_a_uniform_permutation() -> None:
    policy = build("random")
    chosen = policy.select(contexts(0, b=4000)).chosen
    counts = np.bincount(chosen, minlength=N)
    # chi-square with 3 degrees of freedom: 16.3 is its 0.999 quantile
    expected = 4000 / N
    assert ((counts - expected) ** 2 / expected).sum() < 16.3


def test_best_single_asks_best_rm_then_the_others_by_index() -> None:
    selection = build("best-single").select(contexts(0, b=3))
    assert selection.ranking.tolist() == [[2, 0, 1, 3]] * 3


def test_no_online_ranks_by_prior_mean_scores_and_never_learns() -> None:
    policy = build("bayesian-no-online")
    h = contexts(5)
    expected = np.argsort(-(h @ prior().T), axis=1, kind="stable")
    np.testing.assert_array_equal(policy.select(h).ranking, expected)
    policy.update(h, np.zeros(10, dtype=int), np.ones(10))
    np.testing.assert_array_equal(policy.select(h).ranking, expected)


def test_weighted_score_endpoints() -> None:
    h = contexts(6)
    offline_only = build("weighted-score", alpha=1.0).select(h).ranking
    np.testing.assert_array_equal(offline_only, build("bayesian-no-online").select(h).ranking)
    online_only = run_stream(build("weighted-score", seed=9, alpha=0.0))
    no_offline = run_stream(build("bayesian-no-offline", seed=9))
    for a, b in zip(online_only, no_offline, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bayesian_update_goes_into_the_posterior_and_no_offline_ignores_the_prior() -> None:
    policy = build_bayes()
    assert isinstance(policy.posteriors, GaussianPosteriors)
    np.testing.assert_allclose(policy.posteriors.means(), prior())
    zero = build_bayes("bayesian-no-offline")
    np.testing.assert_array_equal(zero.posteriors.means(), np.zeros((N, D)))
    h = contexts(7)
    policy.update(h, np.arange(10) % N, np.ones(10))
    assert policy.posteriors.counts.tolist() == [3, 3, 2, 2]
    expected = GaussianPosteriors.from_prior(prior(), lambda0=DEFAULT_LAMBDA0)
    expected.observe(np.arange(10) % N, h, np.ones(10), sigma2=DEFAULT_SIGMA2)
    np.testing.assert_allclose(policy.posteriors.means(), expected.means(), atol=1e-12)


def test_posteriors_can_be_restored_into_a_fresh_policy() -> None:
    trained = build_bayes(seed=1)
    run_stream(trained)
    restored = build_bayes(seed=2)
    restored.posteriors = GaussianPosteriors.from_arrays(trained.posteriors.to_arrays())
    restored.rng = np.random.default_rng(5)
    trained.rng = np.random.default_rng(5)
    h = contexts(8)
    np.testing.assert_array_equal(restored.select(h).ranking, trained.select(h).ranking)
    with pytest.raises(ConfigError) as info:
        restored.posteriors = GaussianPosteriors.from_prior(np.zeros((N + 1, D)), lambda0=1.0)
    assert info.value.field == "posteriors"


def test_forgetting_in_the_policy_pulls_back_toward_the_prior() -> None:
    keep, forget = build_bayes(), build_bayes(forgetting=0.9)
    h = contexts(9)
    for policy in (keep, forget):
        policy.update(h, np.zeros(10, dtype=int), np.ones(10))
        for _ in range(5):  # later feedback for other RMs only
            policy.update(h, np.full(10, 1), np.zeros(10))
    gap_keep = np.linalg.norm(keep.posteriors.means()[0] - prior()[0])
    gap_forget = np.linalg.norm(forget.posteriors.means()[0] - prior()[0])
    assert gap_forget < 0.5 * gap_keep


def test_a_strong_prior_cannot_outweigh_a_drifted_rm_under_forgetting() -> None:
    # The prior says RM 0 is right 90% of the time, worth 20,000 rows; then it drifts to 30%.
    # Forgetting (memory ~1/(1-gamma) = 20 rewards) decays the posterior toward that prior
    # capped at forget_obs rows: with 10, the last rewards take RM 0 below RM 1 (0.6); with
    # the uncapped prior as the floor, 300 rewards barely move it.
    means = np.array([[0.0, 0.9], [0.0, 0.6]])
    ctx = np.tile([[0.0, 1.0]], (300, 1))
    drifted = (np.random.default_rng(1).random(300) < 0.3).astype(float)

    def after_drift(**config: float) -> float:
        policy = BayesianPolicy(
            2,
            2,
            np.random.default_rng(0),
            means,
            BayesianConfig(**config),
            prior_precision=np.full((2, 2), 20000.0 / 0.2),
            prior_sigma2=np.array([0.2, 0.2]),
        )
        for i in range(300):
            policy.update(ctx[i : i + 1], np.zeros(1, dtype=int), drifted[i : i + 1])
        return float((ctx[:1] @ policy.posteriors.means().T)[0, 0])

    assert after_drift(forgetting=0.95, forget_obs=10.0) < 0.6
    assert after_drift(forgetting=0.95, forget_obs=1e9) > 0.85
    assert after_drift() > 0.85  # no forgetting: the rows' evidence stands


def test_laser_asks_one_rm_for_the_whole_batch_and_learns_from_the_batch_mean() -> None:
    policy = build("laser", alpha=0.0)
    h = contexts(10)
    selection = policy.select(h)
    assert (selection.ranking == selection.ranking[0]).all()
    # alpha = 0: pure exploitation; after RM 3 earns reward 1 and the others 0, it leads
    for arm in range(N):
        policy.update(h, np.full(10, arm), np.full(10, float(arm == 3)))
    assert (policy.select(contexts(11)).chosen == 3).all()
    laser = build("laser")
    assert isinstance(laser, LaserPolicy)
    laser.update(h, np.array([0] * 5 + [1] * 5), np.array([1.0] * 5 + [0.0] * 5))
    x0, x1 = h[:5].mean(axis=0), h[5:].mean(axis=0)
    np.testing.assert_allclose(laser.design[0], np.eye(D) + np.outer(x0, x0))
    np.testing.assert_allclose(laser.design[1], np.eye(D) + np.outer(x1, x1))
    np.testing.assert_allclose(laser.target[0], x0)
    np.testing.assert_allclose(laser.target[1], np.zeros(D))


def test_non_learning_policies_still_check_feedback() -> None:
    for name in ("random", "majority", "oracle", "best-single", "uwo", "bayesian-no-online"):
        with pytest.raises(ConfigError) as info:
            build(name).update(contexts(0), np.zeros(10, dtype=int), np.full(10, np.nan))
        assert info.value.field == "rewards"


# ---- combine -----------------------------------------------------------------------------

MARGINS = np.array(
    [
        [0.5, np.nan, np.nan, np.nan],
        [np.nan, np.nan, -2.0, np.nan],
        [np.nan, np.nan, np.nan, np.nan],
    ]
)


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_single_rm_combine_returns_the_asked_margin(name: str) -> None:
    out = build(name).combine(MARGINS)
    assert out[:2].tolist() == [0.5, -2.0]
    assert np.isnan(out[2])


def test_majority_votes() -> None:
    margins = np.array([[0.1, 2.0, -0.5, np.nan], [-1.0, -1.0, 3.0, -0.2], [0.0, 1.0, -1.0, 0.0]])
    assert build("majority").combine(margins).tolist() == [1.0, -2.0, 0.0]
    assert np.isnan(build("majority").combine(np.full((1, N), np.nan))[0])


def test_uwo_shrinks_the_mean_by_the_variance_toward_zero() -> None:
    scales = np.array([1.0, 2.0, 4.0, 0.5])
    policy = make_policy(
        "uwo", n_rms=N, dim=D, rng=np.random.default_rng(0), margin_scales=scales, lam=0.5
    )
    rng = np.random.default_rng(3)
    margins = rng.normal(size=(50, N)) * scales
    margins[rng.random((50, N)) < 0.2] = np.nan
    out = policy.combine(margins)
    for row, got in zip(margins, out, strict=True):
        values = (row / scales)[~np.isnan(row)]
        if values.size == 0:
            assert np.isnan(got)
            continue
        mean, var = values.mean(), values.var()
        expected = np.sign(mean) * max(abs(mean) - 0.5 * var, 0.0)
        assert got == pytest.approx(expected, abs=1e-12)
        assert got == 0.0 or np.sign(got) == np.sign(mean)  # never flips the label
    agree = policy.combine(np.array([[1.0, 2.0, 4.0, 0.5]]))  # all at +1 after scaling
    assert agree.tolist() == [1.0]


def test_oracle_is_right_if_any_rm_is_right() -> None:
    margins = np.array([[-1.0, -0.2, 0.3, np.nan], [-1.0, -0.2, -3.0, -0.1]])
    assert build("oracle").combine(margins).tolist() == [0.3, -0.1]


# ---- configuration errors ----------------------------------------------------------------

BAD: list[tuple[str, dict[str, Any], str]] = [
    ("bayesian", {"lambda0": 0.0}, "lambda0"),
    ("bayesian", {"lambda0": -1.0}, "lambda0"),
    ("bayesian", {"lambda0": float("nan")}, "lambda0"),
    ("bayesian", {"lambda0": "1"}, "lambda0"),
    ("bayesian", {"sigma2": 0.0}, "sigma2"),
    ("bayesian", {"forgetting": 0.0}, "forgetting"),
    ("bayesian", {"forgetting": 1.01}, "forgetting"),
    ("bayesian", {"forget_obs": 0.0}, "forget_obs"),
    ("bayesian-no-offline", {"sigma2": -0.1}, "sigma2"),
    ("bayesian", {"alpha": 0.5}, "alpha"),
    ("weighted-score", {"alpha": 1.5}, "alpha"),
    ("weighted-score", {"alpha": -0.1}, "alpha"),
    ("weighted-score", {"lambda0": 0.0}, "lambda0"),
    ("laser", {"alpha": -1.0}, "alpha"),
    ("laser", {"ridge": 0.0}, "ridge"),
    ("uwo", {"lam": -0.5}, "lam"),
    ("random", {"lam": 1.0}, "lam"),
    ("bayesian-no-online", {"lambda0": 1.0}, "lambda0"),
    ("bandit", {}, "policy"),
]


@pytest.mark.parametrize("name,params,field", BAD)
def test_bad_params_fail_naming_the_field(name: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(name, **params)
    assert info.value.field == field
    assert field in str(info.value)


def test_range_is_in_the_message() -> None:
    with pytest.raises(ConfigError, match=r"lambda0: must be a finite number in \[0.001, 1e\+06\]"):
        build("bayesian", lambda0=0.0)
    with pytest.raises(ConfigError, match=r"alpha: must be a finite number in \[0, 1\]"):
        build("weighted-score", alpha=2.0)


def _make(**overrides: Any) -> Policy:
    args: dict[str, Any] = {
        "n_rms": N,
        "dim": D,
        "rng": np.random.default_rng(0),
        "prior_means": prior(),
        "best_rm": 0,
    }
    args.update(overrides)
    name = args.pop("name", "bayesian")
    return make_policy(name, **args)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"prior_means": np.zeros((N, D + 1))}, "prior_means"),
        ({"prior_means": np.zeros((N - 1, D))}, "prior_means"),
        ({"prior_means": np.full((N, D), np.nan)}, "prior_means"),
        ({"prior_means": None}, "prior_means"),
        ({"name": "weighted-score", "prior_means": None}, "prior_means"),
        ({"name": "bayesian-no-online", "prior_means": None}, "prior_means"),
        ({"name": "best-single", "best_rm": N}, "best_rm"),
        ({"name": "best-single", "best_rm": -1}, "best_rm"),
        ({"name": "best-single", "best_rm": None}, "best_rm"),
        ({"name": "uwo", "margin_scales": np.array([1.0, 0.0, 1.0, 1.0])}, "margin_scales"),
        ({"name": "uwo", "margin_scales": np.ones(N + 1)}, "margin_scales"),
        ({"n_rms": 0}, "n_rms"),
        ({"dim": 0}, "dim"),
        ({"rng": 7}, "rng"),
    ],
)
def test_bad_arguments_fail_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        _make(**overrides)
    assert info.value.field == field


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_nan_contexts_and_rewards_fail_naming_the_field(name: str) -> None:
    policy = build(name)
    bad = contexts(0)
    bad[3, 1] = np.nan
    with pytest.raises(ConfigError) as info:
        policy.select(bad)
    assert info.value.field == "contexts"
    with pytest.raises(ConfigError) as info:
        policy.select(np.ones((2, D + 1)))
    assert info.value.field == "contexts"
    rewards = np.ones(10)
    rewards[0] = np.nan
    with pytest.raises(ConfigError) as info:
        policy.update(contexts(0), np.zeros(10, dtype=int), rewards)
    assert info.value.field == "rewards"
    with pytest.raises(ConfigError) as info:
        policy.update(contexts(0), np.full(10, N), np.ones(10))
    assert info.value.field == "arms"


def test_forgetting_a_huge_batch_does_not_underflow_into_an_error() -> None:
    policy = build_bayes(forgetting=0.5)
    h = np.repeat(contexts(12, b=1), 2000, axis=0)
    policy.update(h, np.zeros(2000, dtype=int), np.ones(2000))  # 0.5**2000 == 0.0 in float64
    assert policy.posteriors.counts[0] == 2000
    np.testing.assert_allclose(policy.posteriors.means()[1:], prior()[1:], atol=1e-12)


def test_policies_built_directly_check_their_arguments() -> None:
    from gateway.routing import RandomPolicy

    with pytest.raises(ConfigError) as info:
        RandomPolicy(n_rms=0, dim=3, rng=np.random.default_rng(0))
    assert info.value.field == "n_rms"
    with pytest.raises(ConfigError) as info:
        RandomPolicy(n_rms=2, dim=3, rng=np.random.RandomState(0))  # type: ignore[arg-type]
    assert info.value.field == "rng"


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_combine_checks_the_margins_shape(name: str) -> None:
    policy = build(name)
    for bad in (np.zeros((2, N + 1)), np.zeros(N), np.array([[np.inf, 0.0, 0.0, 0.0]])):
        with pytest.raises(ConfigError) as info:
            policy.combine(bad)
        assert info.value.field == "margins"


def test_a_clearly_worse_rm_is_not_explored_but_a_close_one_is() -> None:
    """explore_z: an RM whose draw can hardly beat the leader is left out of the draw (here with
    forgetting on, where explore_z is the gate; without, stationary_z, the leader by mean)."""
    means = np.array([[0.0, 0.9], [0.0, 0.6], [0.0, 0.88]])  # intercepts: 0.9, 0.6, 0.88
    ctx = np.tile([[1.0, 1.0]], (400, 1))
    # full spread from the first pair
    full = BayesianConfig(lambda0=400.0, explore_ramp=0.0, forgetting=0.999)
    gated = BayesianPolicy(3, 2, np.random.default_rng(0), means, full)
    picks = np.bincount(gated.select(ctx).chosen, minlength=3)
    assert picks[1] == 0 and picks[0] > picks[2] > 0  # RM 2 is close: still explored
    stationary = BayesianPolicy(
        3, 2, np.random.default_rng(0), means, BayesianConfig(lambda0=400.0, explore_ramp=0.0)
    )
    assert (stationary.select(ctx).chosen == 0).all()  # no forgetting: the leader by mean
    plain = BayesianPolicy(
        3,
        2,
        np.random.default_rng(0),
        means,
        BayesianConfig(lambda0=4.0, stationary_z=None, explore_ramp=0.0),
    )
    assert np.bincount(plain.select(ctx).chosen, minlength=3)[1] > 0  # plain TS draws it
    # The ranking still lists every RM (the fallback order): the left-out one last.
    assert (gated.select(ctx[:5]).ranking[:, -1] == 1).all()
    # With the ramp and no observation yet, the draw is the posterior mean: no exploring.
    ramped = BayesianPolicy(
        3, 2, np.random.default_rng(0), means, BayesianConfig(lambda0=400.0, forgetting=0.999)
    )
    assert ramped.exploration() == 0.0
    assert (ramped.select(ctx).chosen == 0).all()


def test_the_leader_is_the_best_rm_that_can_judge_the_pair() -> None:
    """A verifier sure of itself (0.9, it leads on math) cannot judge a chat pair (no
    reference): it must not be the leader there. Against it the well-known chat RM (0.58, sure)
    looked implausible and a rarely asked one (0.5, sd 0.25) was always first once the verifier
    was moved last; against the chat RM it is drawn only when its draw beats it (~37 %)."""
    means = np.array([[0.0, 0.58], [0.0, 0.5], [0.0, 0.9]])  # [pair weight; intercept]
    precision = np.array([[1.0, 1e4], [1.0, 16.0], [1.0, 1e4]])
    ctx = np.tile([[0.0, 1.0]], (2000, 1))
    askable = np.tile([True, True, False], (2000, 1))
    no_reference = np.array([False, False, True])

    def first_picks(mask: np.ndarray | None) -> np.ndarray:
        policy = BayesianPolicy(
            3, 2, np.random.default_rng(1), means,
            BayesianConfig(explore_ramp=0.0, stationary_z=2.0),
            prior_precision=precision,
        )  # fmt: skip
        ranking = reference_last(
            policy.select(ctx, mask).ranking, no_reference, np.zeros(2000, bool)
        )
        return np.bincount(ranking[:, 0], minlength=3) / len(ctx)

    assert first_picks(None)[1] == 1.0  # the old behaviour, without the mask
    share = first_picks(askable)
    assert share[2] == 0.0 and 0.3 < share[1] < 0.45 and share[0] == pytest.approx(1 - share[1])
    # a pair that no RM can judge keeps every RM (the verifier leads, as before)
    policy = BayesianPolicy(3, 2, np.random.default_rng(1), means, prior_precision=precision)
    assert policy.select(ctx[:3], np.zeros((3, 3), bool)).ranking[:, 0].tolist() == [2, 2, 2]
    with pytest.raises(ConfigError, match="askable"):
        policy.select(ctx[:3], np.ones((3, 2), bool))
    assert askable_mask(no_reference, np.array([True, False])).tolist() == [
        [True, True, True],
        [True, True, False],
    ]


def test_per_rm_noise_makes_a_near_certain_rm_learn_faster() -> None:
    means = np.array([[0.0, 0.5], [0.0, 0.5]])
    policy = BayesianPolicy(
        2,
        2,
        np.random.default_rng(0),
        means,
        prior_precision=np.full((2, 2), 10.0),
        prior_sigma2=np.array([0.05, 0.25]),
    )
    ctx = np.tile([[0.0, 1.0]], (10, 1))
    policy.update(ctx, np.zeros(10, dtype=int), np.ones(10))
    policy.update(ctx, np.ones(10, dtype=int), np.ones(10))
    mean0, mean1 = (ctx[:1] @ policy.posteriors.means().T)[0]
    assert mean0 > mean1 > 0.5  # the same evidence counts for more from the quieter RM


def test_paper_preset_injects_the_raw_head_with_plain_thompson() -> None:
    raw = np.array([[0.0, 3.0], [0.0, -3.0]])
    calibrated = np.array([[0.0, 0.6], [0.0, 0.5]])
    policy = make_policy(
        "bayesian-paper",
        n_rms=2,
        dim=2,
        rng=np.random.default_rng(0),
        prior_means=calibrated,
        raw_prior_means=raw,
    )
    assert policy.config.explore_z is None and policy.config.lambda0 == 10.0  # type: ignore[attr-defined]
    np.testing.assert_allclose(policy.posteriors.means(), raw)  # type: ignore[attr-defined]
