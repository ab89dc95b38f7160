"""The routers on synthetic contextual problems with known, linear RM accuracies.

Four RMs; the probability that RM n labels a pair with context h = [x; 1] correctly is
``h^T theta_n`` (x unit-norm), so the best RM depends on the pair. Rewards are that correctness
(Bernoulli). Regret of a pair = best accuracy - accuracy of the RM asked (expected, so the
comparison does not depend on the Bernoulli noise of the rewards). Fixed seeds, several
repetitions.
"""

from __future__ import annotations

import math

import numpy as np

from gateway.routing import make_policy, with_intercept

N_RMS, D_FEAT = 4, 6
STREAM, BATCH = 1200, 8
SEEDS = range(6)


def accuracies_model(seed: int, spread: float = 0.35) -> np.ndarray:
    """theta (N, d + 1): accuracy 0.55 on average, +- spread along one direction per RM."""
    u = np.random.default_rng(seed).normal(size=(N_RMS, D_FEAT))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return np.concatenate([spread * u, np.full((N_RMS, 1), 0.55)], axis=1)


def run(
    name: str, theta: np.ndarray, seed: int, prior_noise: float = 0.15, **params: float
) -> np.ndarray:
    """Per-pair regret over the stream for the policy ``name``."""
    data = np.random.default_rng(seed + 1000)
    # the offline router's prior: the truth seen through noise
    prior = theta + prior_noise * data.normal(size=theta.shape)
    policy = make_policy(
        name,
        n_rms=N_RMS,
        dim=D_FEAT + 1,
        rng=np.random.default_rng(seed + 2000),
        prior_means=prior,
        best_rm=0,
        **params,
    )
    regret = []
    for _ in range(STREAM // BATCH):
        x = data.normal(size=(BATCH, D_FEAT))
        h = with_intercept(x / np.linalg.norm(x, axis=1, keepdims=True))
        accuracy = np.clip(h @ theta.T, 0.0, 1.0)
        arms = policy.select(h).chosen
        asked = accuracy[np.arange(BATCH), arms]
        regret.append(accuracy.max(axis=1) - asked)
        policy.update(h, arms, (data.random(BATCH) < asked).astype(float))
    return np.concatenate(regret)


def test_bayesian_regret_grows_sublinearly_and_beats_laser() -> None:
    halves = {"bayesian": [], "laser": []}  # type: dict[str, list[tuple[float, float]]]
    for seed in SEEDS:
        theta = accuracies_model(seed)
        for name in halves:
            # Thompson sampling's own learning, at full spread from the first pair.
            params = {"explore_ramp": 0.0, "stationary_z": 2.0} if name == "bayesian" else {}
            regret = run(name, theta, seed, **params)
            halves[name].append((regret[: STREAM // 2].sum(), regret[STREAM // 2 :].sum()))
    bayes = np.array(halves["bayesian"])
    laser = np.array(halves["laser"])
    # learning: the second half of the stream costs clearly less than the first, in every run
    assert (bayes[:, 1] < 0.8 * bayes[:, 0]).all(), bayes
    assert bayes[:, 1].sum() < 0.65 * bayes[:, 0].sum(), bayes
    # per-pair routing beats one RM per batch, in every run, and by a wide margin overall
    assert (bayes.sum(axis=1) < laser.sum(axis=1)).all(), (bayes, laser)
    assert bayes.sum() < 0.7 * laser.sum()


def test_the_exploration_ramp_costs_less_early_and_still_learns() -> None:
    """explore_ramp: little exploration while the stream is short, full Thompson later."""
    early_ramp, early_plain, late_ramp = 0.0, 0.0, []
    for seed in SEEDS:
        theta = accuracies_model(seed)
        ramp = run("bayesian", theta, seed, explore_ramp=500.0, stationary_z=2.0)
        plain = run("bayesian", theta, seed, explore_ramp=0.0, stationary_z=2.0)
        early_ramp += ramp[:200].sum()
        early_plain += plain[:200].sum()
        late_ramp.append((ramp[:600].sum(), ramp[600:].sum()))
    assert early_ramp < early_plain
    first, second = np.array(late_ramp).sum(axis=0)
    assert second < 0.8 * first


def test_on_a_stationary_stream_the_posterior_means_leader_regrets_less_than_thompson() -> None:
    """The default without forgetting (``stationary_z`` = 0) asks the leader by posterior mean.
    With contexts this diverse every RM's rewards inform the others' pairs, and its regret is
    below Thompson sampling's (gated at z = 2, or plain) while it still learns."""
    greedy, gated, plain = [], [], []
    for seed in SEEDS:
        theta = accuracies_model(seed)
        greedy.append(run("bayesian", theta, seed))
        gated.append(run("bayesian", theta, seed, stationary_z=2.0))
        plain.append(run("bayesian", theta, seed, stationary_z=None))
    total = {
        k: float(np.sum(v)) for k, v in (("greedy", greedy), ("gated", gated), ("plain", plain))
    }
    assert total["greedy"] < 0.9 * min(total["gated"], total["plain"]), total
    halves = np.array([(r[: STREAM // 2].sum(), r[STREAM // 2 :].sum()) for r in greedy])
    assert halves[:, 1].sum() < 0.8 * halves[:, 0].sum(), halves


def test_bayesian_learns_without_the_offline_prior_too() -> None:
    totals = []
    for seed in SEEDS:
        regret = run("bayesian-no-offline", accuracies_model(seed), seed)
        totals.append((regret[: STREAM // 2].sum(), regret[STREAM // 2 :].sum()))
    first, second = np.array(totals).sum(axis=0)
    assert second < 0.7 * first


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_the_best_arm_wins() -> None:
    """One RM is best on every pair (0.75 vs 0.6: an intercept, no context effect). Over the last
    400 pairs, the Bayesian router must ask it far more often than chance (1/4): a one-sided
    binomial test at p < 1e-6 in every run. The prior is uninformative (zero means)."""
    for seed in SEEDS:
        theta = np.zeros((N_RMS, D_FEAT + 1))
        theta[:, -1] = 0.6
        best = seed % N_RMS
        theta[best, -1] = 0.75
        data = np.random.default_rng(seed)
        policy = make_policy(
            "bayesian-no-offline", n_rms=N_RMS, dim=D_FEAT + 1, rng=np.random.default_rng(seed)
        )
        picks = []
        for _ in range(STREAM // BATCH):
            x = data.normal(size=(BATCH, D_FEAT))
            h = with_intercept(x / np.linalg.norm(x, axis=1, keepdims=True))
            arms = policy.select(h).chosen
            picks.append(arms)
            rewards = data.random(BATCH) < theta[arms, -1]
            policy.update(h, arms, rewards.astype(float))
        last = np.concatenate(picks)[-400:]
        wins = int((last == best).sum())
        assert binomial_upper_tail(wins, 400, 1 / N_RMS) < 1e-6, (seed, wins)
        assert np.bincount(last, minlength=N_RMS).argmax() == best
