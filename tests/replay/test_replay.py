"""The replay evaluation: cross-fitting, the output shape, and that routing really learns."""

from __future__ import annotations

from typing import Any, NoReturn

import numpy as np
import pytest

from gateway.replay import (
    ReplayConfig,
    group_folds,
    oriented_margins,
    parse_policies,
    run_replay,
    torch_router_fitter,
)
from gateway.routing import POLICY_NAMES
from reward_router.data import BehaviorMatrix, Pair
from reward_router.errors import ConfigError


def _matrix(
    correct: np.ndarray, domains: list[str], groups: list[str] | None = None
) -> BehaviorMatrix:
    pairs = [
        Pair(
            id=f"p{i}",
            prompt=[{"role": "user", "content": "q"}],
            chosen="c",
            rejected="r",
            domain=domains[i],
            group=groups[i] if groups else f"g{i}",
        )
        for i in range(correct.shape[0])
    ]
    rms = [f"rm{n}" for n in range(correct.shape[1])]
    return BehaviorMatrix(pairs, rms, correct, np.full(correct.shape, np.nan))


def _specialists(n_pairs: int = 240, seed: int = 0) -> tuple[BehaviorMatrix, np.ndarray]:
    """Two domains; RM0 is right 90% on domain x and 30% on y, RM1 the reverse, RM2 at 55%.

    The features carry the domain (plus noise), so a router can learn who to ask.
    """
    rng = np.random.default_rng(seed)
    domain = rng.integers(0, 2, n_pairs)
    p_right = np.where(domain[:, None] == 0, [0.9, 0.3, 0.55], [0.3, 0.9, 0.55])
    correct = (rng.random((n_pairs, 3)) < p_right).astype(np.float64)
    features = rng.normal(0, 0.3, (n_pairs, 16))
    features[:, 0] += np.where(domain == 0, 1.0, -1.0)
    return _matrix(correct, ["x" if d == 0 else "y" for d in domain]), features.astype(np.float32)


def test_group_folds_keep_groups_together_and_balance_rows() -> None:
    groups = [f"g{i // 3}" for i in range(300)]  # 100 groups of 3 rows
    folds = group_folds(groups, 5, np.random.default_rng(1))
    for g in set(groups):
        assert len({folds[i] for i, gg in enumerate(groups) if gg == g}) == 1
    counts = np.bincount(folds, minlength=5)
    assert counts.max() - counts.min() <= 3


def test_group_folds_need_enough_groups() -> None:
    with pytest.raises(ConfigError, match="folds"):
        group_folds(["a", "a", "b"], 3, np.random.default_rng(0))


def test_oriented_margins_agree_with_correct() -> None:
    m = _matrix(np.array([[1.0, 0.0, 0.5]]), ["x"])
    m.margins[0] = [-2.0, 3.0, np.nan]  # magnitudes kept, signs follow `correct`
    assert oriented_margins(m).tolist() == [[2.0, -3.0, 0.0]]


def test_parse_policies() -> None:
    assert parse_policies("all") == POLICY_NAMES
    with pytest.raises(ConfigError, match="policies"):
        parse_policies("bayesian,nope")
    with pytest.raises(ConfigError, match="reward_noise"):
        ReplayConfig(reward_noise=0.7)
    with pytest.raises(ConfigError, match="folds"):
        ReplayConfig(folds=1)


def test_json_shape_calls_and_bounds() -> None:
    matrix, features = _specialists(n_pairs=120)
    config = ReplayConfig(folds=3, seeds=2)
    result = run_replay(matrix, features, config, torch_router_fitter({"epochs": 30}))
    out = result.to_json()
    assert set(out) == {
        "pairs", "rms", "folds", "seeds", "policies", "reward", "stream_order",
        "max_calls_per_pair", "offline_share", "matrix",
    }  # fmt: skip
    assert out["pairs"] == 120 and out["rms"] == ["rm0", "rm1", "rm2"]
    assert set(out["policies"]) == set(POLICY_NAMES)
    for name, row in out["policies"].items():
        keys = {"accuracy", "accuracy_std", "accuracy_se", "rm_calls_per_pair", "by_domain"}
        keys |= {"quarters", "quarters_se"} | (
            {"gain_over_no_online"} if name == "bayesian" else set()
        )
        assert set(row) == keys
        assert len(row["quarters"]) == 4
        assert set(row["by_domain"]) == {"x", "y"}
        expected_calls = 3.0 if name in ("majority", "uwo", "oracle") else 1.0
        assert row["rm_calls_per_pair"] == pytest.approx(expected_calls), name
    acc = {n: r["accuracy"] for n, r in out["policies"].items()}
    # the oracle is right whenever any RM is: nothing can beat it
    assert acc["oracle"] == max(acc.values())
    # every pair of every seed was evaluated exactly once
    for trace in result.traces.values():
        for rows in trace.rows:
            assert sorted(rows.tolist()) == list(range(120))


def test_bayesian_learns_who_to_ask() -> None:
    matrix, features = _specialists(n_pairs=300, seed=3)
    policies = ("bayesian", "random", "best-single", "majority", "bayesian-no-online")
    config = ReplayConfig(folds=5, seeds=2, policies=policies)
    result = run_replay(matrix, features, config, torch_router_fitter({"epochs": 60}))
    acc = {n: float(result.accuracy(n).mean()) for n in policies}
    # per domain the right specialist is right 90% of the time; any single RM ~60%
    assert acc["bayesian"] > 0.8, acc
    assert acc["bayesian"] > acc["best-single"] + 0.15, acc
    assert acc["bayesian"] > acc["random"] + 0.15, acc
    share = result.pick_share("bayesian")
    assert share[2] < 0.2, share  # the mediocre generalist is rarely asked


def test_reward_noise_is_seeded_and_reproducible() -> None:
    matrix, features = _specialists(n_pairs=90)
    config = ReplayConfig(folds=3, seeds=1, reward_noise=0.2, policies=("bayesian-no-offline",))

    def no_router(*args: object) -> NoReturn:
        raise AssertionError("a policy without an offline prior must not fit a router")

    a = run_replay(matrix, features, config, no_router).to_json()
    b = run_replay(matrix, features, config, no_router).to_json()
    c = run_replay(matrix, features, ReplayConfig(**{**config.__dict__, "seed": 1}), no_router)
    assert a == b
    assert c.to_json() != a


def _no_router(*args: object) -> NoReturn:
    raise AssertionError("these policies need no offline router")


def test_second_opinions_stay_within_the_budget_and_fix_ties() -> None:
    """RM0 ties on a third of the pairs and is right otherwise; RM1 is right 70% everywhere."""
    rng = np.random.default_rng(4)
    n = 300
    correct = np.c_[np.where(rng.random(n) < 1 / 3, 0.5, 1.0), rng.random(n) < 0.7].astype(float)
    matrix = _matrix(correct, ["x"] * n)
    base = ReplayConfig(folds=3, seeds=2, policies=("best-single",))
    single = run_replay(matrix, np.zeros((n, 1)), base, _no_router)
    budget = ReplayConfig(**{**base.__dict__, "max_calls_per_pair": 1.2})
    second = run_replay(matrix, np.zeros((n, 1)), budget, _no_router)
    assert single.calls_per_pair("best-single") == 1.0
    assert 1.15 < second.calls_per_pair("best-single") <= 1.2
    gain = second.accuracy("best-single").mean() - single.accuracy("best-single").mean()
    # A fifth of the pairs are re-asked, all ties (worth 0.5): the second RM is right on 70%.
    assert gain == pytest.approx(0.2 * 0.2, abs=0.02)


def test_an_offline_share_fits_the_router_on_that_share_of_the_training_groups() -> None:
    """The offline stage sees a quarter of each fold's training groups, whole; the stream is
    the held-out fold as before, so every pair is still evaluated once per seed."""
    matrix, features = _specialists(n_pairs=240, seed=6)
    groups = [p.group for p in matrix.pairs]
    fitter = torch_router_fitter({"epochs": 5})
    seen: list[list[str]] = []

    def recording(*args: Any) -> Any:
        seen.append(list(args[2]))
        return fitter(*args)

    config = ReplayConfig(folds=3, seeds=1, policies=("bayesian",), offline_share=0.25)
    result = run_replay(matrix, features, config, recording)
    assert len(seen) == 3
    for fold_groups in seen:
        # 160 training rows of one group each: a quarter of them
        assert len(fold_groups) == 40 and len(set(fold_groups)) == 40
        assert set(fold_groups) <= set(groups)
    assert sorted(result.traces["bayesian"].rows[0].tolist()) == list(range(240))
    assert result.to_json()["offline_share"] == 0.25
    with pytest.raises(ConfigError, match="offline_share"):
        ReplayConfig(offline_share=0.0)


def test_drift_breaks_the_training_best_rm_halfway() -> None:
    rng = np.random.default_rng(5)
    n = 400
    correct = np.c_[rng.random(n) < 0.9, rng.random(n) < 0.7, rng.random(n) < 0.3].astype(float)
    matrix = _matrix(correct, ["x"] * n)
    config = ReplayConfig(folds=2, seeds=2, policies=("best-single",), stream_order="drift")
    result = run_replay(matrix, np.zeros((n, 1)), config, _no_router)
    quarters = result.quarters("best-single").mean(axis=0)
    assert quarters[:2].mean() > 0.85 and quarters[2:].mean() < 0.4  # 0.9, then the worst's 0.3
    out = result.to_json()
    assert out["stream_order"] == "drift" and out["matrix"]["best_single"] == pytest.approx(
        correct.mean(axis=0).max()
    )


def test_online_learning_catches_a_drift_that_the_frozen_prior_misses() -> None:
    """Two specialists that are decent elsewhere, and a poor RM; halfway the training-best
    specialist starts answering like the poor one: only the online phase moves off it.

    The pairs carry one domain label, so the router has no domain head: with the two regions
    named as domains the frozen prior already routes each region to its specialist, and the
    drift costs it only the degraded specialist's region (measured on this matrix: no-online
    0.76 with the head, 0.62 without; the online phase's last-quarter gain 0.01 with it)."""
    rng = np.random.default_rng(2)
    n = 600
    domain = rng.integers(0, 2, n)
    p_right = np.where(domain[:, None] == 0, [0.92, 0.75, 0.3], [0.75, 0.9, 0.3])
    correct = (rng.random((n, 3)) < p_right).astype(np.float64)
    features = rng.normal(0, 0.3, (n, 16)).astype(np.float32)
    features[:, 0] += np.where(domain == 0, 1.0, -1.0)
    matrix = _matrix(correct, ["mixed"] * n)
    config = ReplayConfig(
        folds=2,
        seeds=2,
        policies=("bayesian", "bayesian-no-online"),
        stream_order="drift",
        policy_params={"bayesian": {"forgetting": 0.98}},
    )
    result = run_replay(matrix, features, config, torch_router_fitter({"epochs": 60}))
    gain = result.gain_over_no_online("bayesian")
    assert gain is not None and gain["last_quarter"] > 0.05, gain


def test_dpo_proxy_reward_reaches_every_online_policy() -> None:
    matrix, features = _specialists(n_pairs=240, seed=3)
    policies = ("bayesian", "bayesian-paper", "bayesian-no-online", "laser")
    config = ReplayConfig(folds=2, seeds=1, policies=policies, reward="dpo-proxy")
    result = run_replay(matrix, features, config, torch_router_fitter({"epochs": 40}))
    out = result.to_json()
    assert out["reward"] == "dpo-proxy"
    acc = {n: r["accuracy"] for n, r in out["policies"].items()}
    # The link keeps the weak, centred −DPO signal from undoing a good prior.
    assert acc["bayesian"] >= acc["bayesian-no-online"] - 0.05, acc
    with pytest.raises(ConfigError, match="reward_noise"):
        ReplayConfig(reward="noisy")
    with pytest.raises(ConfigError, match="stream_order"):
        ReplayConfig(stream_order="sorted")


def test_gold_audits_cost_their_calls_and_feed_calibrated_agreement() -> None:
    """Audited pairs are labelled by the auditor too; only ``bayesian`` audits."""
    matrix, features = _specialists(n_pairs=240, seed=6)
    policies = ("bayesian", "bayesian-no-online")
    config = ReplayConfig(
        folds=2, seeds=1, policies=policies, reward="dpo-proxy", audit_rate=0.2, audit_rm="rm0"
    )
    result = run_replay(matrix, features, config, torch_router_fitter({"epochs": 30}))
    assert 1.05 < result.calls_per_pair("bayesian") < 1.25  # rm0's own pairs need no audit
    assert result.calls_per_pair("bayesian-no-online") == 1.0
    with pytest.raises(ConfigError, match="audit_rm"):
        bad = ReplayConfig(folds=2, seeds=1, policies=policies, audit_rate=0.1, audit_rm="nope")
        run_replay(matrix, features, bad, torch_router_fitter({"epochs": 5}))


def test_a_verifier_is_ranked_last_on_pairs_without_a_reference() -> None:
    """RM0 (a verifier) is right on the pairs with a reference and ties on the rest; RM1 is
    right 60% everywhere, RM2 40%. As in the gateway, ``needs_reference`` keeps every
    single-RM policy off the verifier where it could only tie; best-single falls back to the
    next RM by training accuracy."""
    rng = np.random.default_rng(6)
    n = 300
    has = rng.random(n) < 0.5
    correct = np.c_[np.where(has, 1.0, 0.5), rng.random(n) < 0.6, rng.random(n) < 0.4]
    matrix = _matrix(correct.astype(float), ["x"] * n)
    matrix = BehaviorMatrix(
        [
            Pair(**{**p.__dict__, "meta": {"reference": "42"}}) if h else p
            for p, h in zip(matrix.pairs, has, strict=True)
        ],
        matrix.rms,
        matrix.correct,
        matrix.margins,
    )
    base = ReplayConfig(folds=3, seeds=2, policies=("best-single", "random"))
    plain = run_replay(matrix, np.zeros((n, 1)), base, _no_router)
    rule = ReplayConfig(**{**base.__dict__, "needs_reference": ("rm0",)})
    ruled = run_replay(matrix, np.zeros((n, 1)), rule, _no_router)
    for result in (plain, ruled):
        assert result.best_single == pytest.approx(correct[:, 0].mean())  # the matrix's figure
    # Without the rule best-single asks the verifier everywhere: 1.0 with a reference, 0.5 not.
    assert plain.accuracy("best-single").mean() == pytest.approx(correct[:, 0].mean())
    want = np.where(has, 1.0, correct[:, 1]).mean()
    assert ruled.accuracy("best-single").mean() == pytest.approx(want)
    # No single-RM policy asks the verifier about a pair without a reference.
    share = ruled.pick_share("random")
    assert share[0] == pytest.approx(has.mean() / 3, abs=0.05)
    with pytest.raises(ConfigError, match="needs_reference"):
        bad = ReplayConfig(**{**base.__dict__, "needs_reference": ("judge",)})
        run_replay(matrix, np.zeros((n, 1)), bad, _no_router)
