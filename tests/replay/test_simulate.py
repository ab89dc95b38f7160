"""The synthetic-RM generator: accuracies as specified, errors shared by rho, seeded, validated."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import gateway.simulate
from gateway.simulate import (
    PRESETS,
    domain_probe,
    error_correlation,
    parse_spec,
    preset,
    probe_report,
    simulate_behavior,
    stratified_subsample,
    summarize,
)
from reward_router.data import Pair
from reward_router.errors import ConfigError

DOMAINS = ("chat", "safety", "math", "code")


def _pairs(n: int, domains: tuple[str, ...] = DOMAINS) -> list[Pair]:
    return [
        Pair(id=f"p{i}", prompt=[], chosen="c", rejected="r", domain=domains[i % len(domains)])
        for i in range(n)
    ]


SPEC = {
    "rho": 0.4,
    "rms": [
        {"name": "chat-rm", "default": 0.55, "accuracy": {"chat": 0.9, "math": 0.3}},
        {"name": "math-rm", "default": 0.6, "accuracy": {"math": 0.92}},
        {"name": "flat", "default": 0.7},
    ],
}


@pytest.mark.parametrize("tie_rate", [0.0, 0.1])
def test_accuracy_matches_the_spec_per_rm_and_domain(tie_rate: float) -> None:
    pairs = _pairs(40_000)
    spec = parse_spec({**SPEC, "tie_rate": tie_rate})
    matrix = simulate_behavior(pairs, spec, np.random.default_rng(1))
    assert set(np.unique(matrix.correct)) <= {0.0, 0.5, 1.0}
    domains = np.array([p.domain for p in pairs])
    for n, rm in enumerate(spec.rms):
        for d in DOMAINS:
            col = matrix.correct[domains == d, n]
            acc = rm.accuracy_on(d)
            se = np.sqrt(acc * (1 - acc) / col.size)
            assert abs(col.mean() - acc) < 4 * se, (rm.name, d, col.mean(), acc)
    ties = (matrix.correct == 0.5).mean()
    assert abs(ties - tie_rate) < 0.01
    # margins: positive iff right, negative iff wrong, zero iff tie
    assert np.array_equal(np.sign(matrix.margins), 2 * matrix.correct - 1)
    summary = summarize(matrix, spec)
    assert summary.best_single[0] == "flat"
    assert summary.best_rm_per_domain == {
        "chat": "chat-rm",
        "code": "flat",
        "math": "math-rm",
        "safety": "flat",
    }
    assert summary.best_per_domain == pytest.approx((0.9 + 0.92 + 0.7 + 0.7) / 4, abs=0.01)
    assert summary.expected_best_per_domain == pytest.approx((0.9 + 0.92 + 0.7 + 0.7) / 4)
    assert summary.expected_best_single == pytest.approx(0.7)


def test_errors_correlate_more_as_rho_grows() -> None:
    pairs = _pairs(20_000)
    corr = []
    for rho in (0.0, 0.3, 0.6, 0.9):
        spec = parse_spec({**SPEC, "rho": rho})
        corr.append(
            error_correlation(
                simulate_behavior(pairs, spec, np.random.default_rng(2)).correct,
                [p.domain for p in pairs],
            )
        )
    assert abs(corr[0]) < 0.03  # independent errors
    assert corr == sorted(corr) and corr[-1] - corr[0] > 0.3
    # a shared difficulty: where the flat RM is wrong, the others are wrong more often
    spec = parse_spec({**SPEC, "rho": 0.8})
    m = simulate_behavior(pairs, spec, np.random.default_rng(2))
    flat_wrong = m.correct[:, 2] == 0
    assert m.correct[flat_wrong, 1].mean() < m.correct[~flat_wrong, 1].mean() - 0.2


def test_same_seed_same_matrix_other_seed_other_matrix() -> None:
    pairs, spec = _pairs(500), parse_spec(SPEC)
    a = simulate_behavior(pairs, spec, np.random.default_rng(7))
    b = simulate_behavior(pairs, spec, np.random.default_rng(7))
    c = simulate_behavior(pairs, spec, np.random.default_rng(8))
    assert np.array_equal(a.correct, b.correct) and np.array_equal(a.margins, b.margins)
    assert not np.array_equal(a.correct, c.correct)
    assert a.rms == ["chat-rm", "math-rm", "flat"] and a.pairs == pairs


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rho": 1.5}, "rho"),
        ({"rho": "high"}, "rho"),
        ({"tie_rate": -0.1}, "tie_rate"),
        ({"rms": []}, "rms"),
        ({"extra": 1}, "extra"),
        ({"rms": [{"name": "a"}]}, "rms[0].default"),
        ({"rms": [{"name": "a", "default": 1.0}]}, "rms[0].default"),
        ({"rms": [{"name": "", "default": 0.6}]}, "rms[0].name"),
        ({"rms": [{"name": "a", "default": 0.6, "acuracy": {}}]}, "rms[0].acuracy"),
        (
            {"rms": [{"name": "a", "default": 0.6}, {"name": "a", "default": 0.6}]},
            "rms[1].name",
        ),
        ({"rms": [{"name": "a", "default": 0.6, "accuracy": {"math": 0}}]}, "rms[0].accuracy.math"),
        ({"rms": [{"name": "a", "default": 0.6, "accuracy": ["math"]}]}, "rms[0].accuracy"),
        # with 20 % ties an RM cannot be 95 % right: it needs acc ± 0.1 inside (0, 1)
        (
            {"tie_rate": 0.2, "rms": [{"name": "a", "default": 0.6, "accuracy": {"m": 0.95}}]},
            "rms[0].accuracy.m",
        ),
    ],
)
def test_bad_specs_name_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_spec({**SPEC, **change})
    assert err.value.field == field


def test_presets_parse_and_say_what_they_are() -> None:
    assert set(PRESETS) >= {"complementary", "dominant", "paper"}
    for name in PRESETS:
        spec = preset(name)
        assert spec.description and len(spec.rms) >= 3
    comp = preset("complementary")
    assert comp.rms[0].accuracy_on("chat") == 0.85 and comp.rms[0].accuracy_on("math") == 0.55
    assert comp.rms[-1].accuracy_on("anything") == 0.70
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        preset("nope")


def test_stratified_subsample_spreads_over_domains() -> None:
    domains = ["chat"] * 1000 + ["safety"] * 30 + ["math"] * 500
    rows = stratified_subsample(domains, 300, np.random.default_rng(0))
    picked = [domains[i] for i in rows]
    assert len(rows) == len(set(rows.tolist())) == 300
    assert picked.count("safety") == 30
    assert picked.count("chat") == picked.count("math") == 135
    again = stratified_subsample(domains, 300, np.random.default_rng(0))
    assert np.array_equal(rows, again)
    assert stratified_subsample(domains, 5000, np.random.default_rng(0)).size == len(domains)
    with pytest.raises(ConfigError, match="max_pairs"):
        stratified_subsample(domains, 0, np.random.default_rng(0))


def test_docstring_examples() -> None:
    result = doctest.testmod(gateway.simulate, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_domain_probe_tells_separable_domains_apart_and_not_mixed_ones() -> None:
    rng = np.random.default_rng(0)
    n = 600
    pairs = _pairs(n, DOMAINS[:3])
    domains = [p.domain for p in pairs]
    groups = [f"g{i // 2}" for i in range(n)]
    y = np.array([DOMAINS.index(d) for d in domains])
    separable = rng.normal(size=(3, 16))[y] * 3 + rng.normal(size=(n, 16))
    noise = rng.normal(size=(n, 16))
    spec = parse_spec(SPEC)
    matrix = simulate_behavior(pairs, spec, np.random.default_rng(3))
    summary = summarize(matrix, spec)
    good = probe_report(
        matrix, domain_probe(separable, domains, groups, np.random.default_rng(1)), summary
    )
    bad = probe_report(
        matrix, domain_probe(noise, domains, groups, np.random.default_rng(1)), summary
    )
    assert good.accuracy > 0.95 and min(good.recall.values()) > 0.9
    assert bad.accuracy < 0.45
    # routing by a perfect probe is routing by domain; by a blind one, it is much worse
    assert good.routed_accuracy == pytest.approx(summary.best_per_domain, abs=0.02)
    assert bad.routed_accuracy < summary.best_per_domain - 0.05
    assert domain_probe(noise, ["a"] * n, groups, np.random.default_rng(1)) == ["a"] * n
