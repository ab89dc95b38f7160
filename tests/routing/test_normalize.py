"""Reward normalisers: warm-up, quantile and z-score values, sliding window, state round trip."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest

from gateway.routing import QuantileNormalizer, ZScoreNormalizer
from reward_router.errors import ConfigError

Normalizer = QuantileNormalizer | ZScoreNormalizer


def mid_rank(window: list[float], x: float) -> float:
    """Reference quantile by counting, written independently of the vectorised one."""
    below = sum(1 for v in window if v < x)
    equal = sum(1 for v in window if v == x)
    return (below + (equal - 1) / 2) / (len(window) - 1)


def test_quantile_warmup_returns_the_neutral_value() -> None:
    q = QuantileNormalizer(window=100, warmup=5)
    assert q.normalize(np.array([-3.0, 7.0])).tolist() == [0.5, 0.5]
    assert q.normalize(np.array([1.0, 100.0])).tolist() == [0.5, 0.5]  # 4 seen < 5
    out = q.normalize(np.array([50.0]))  # 5 seen: warm-up over, rank among all five
    assert out.tolist() == [pytest.approx(mid_rank([-3.0, 7.0, 1.0, 100.0, 50.0], 50.0))]
    assert out[0] != 0.5


def test_quantile_values_are_mid_ranks_in_the_window() -> None:
    rng = np.random.default_rng(0)
    q = QuantileNormalizer(window=50, warmup=0)
    history: list[float] = []
    for _ in range(20):
        batch = np.round(rng.normal(size=rng.integers(1, 9)), 1)  # rounding makes ties
        history.extend(batch.tolist())
        window = history[-50:]
        out = q.normalize(batch)
        expected = [mid_rank(window, x) for x in batch]
        np.testing.assert_allclose(out, expected, atol=1e-12)
        assert ((out >= 0) & (out <= 1)).all()


def test_quantile_extremes_and_ties() -> None:
    q = QuantileNormalizer(window=10, warmup=0)
    assert q.normalize(np.array([1.0, 2.0, 3.0])).tolist() == [0.0, 0.5, 1.0]
    q = QuantileNormalizer(window=10, warmup=0)
    assert q.normalize(np.array([4.0, 4.0, 4.0])).tolist() == [0.5, 0.5, 0.5]


def test_quantile_window_slides() -> None:
    q = QuantileNormalizer(window=3, warmup=0)
    q.normalize(np.array([1.0, 2.0, 3.0]))
    # window [2, 3, 0]: 0 is the minimum
    assert q.normalize(np.array([0.0])).tolist() == [0.0]
    # window [3, 0, 2.5]: were 1 and 2 still there, 2.5 would rank 3rd of 5, not 2nd of 3
    assert q.normalize(np.array([2.5])).tolist() == [0.5]


@pytest.mark.parametrize(
    "make",
    [
        lambda: QuantileNormalizer(window=16, warmup=4),
        lambda: ZScoreNormalizer(warmup=4),
        lambda: ZScoreNormalizer(warmup=4, squash=False, clip=2.0),
    ],
)
def test_state_round_trips_through_json(make: Callable[[], Normalizer]) -> None:
    rng = np.random.default_rng(1)
    original = make()
    original.normalize(rng.normal(size=3))
    original.normalize(rng.normal(size=7))
    restored = type(original).from_state(json.loads(json.dumps(original.state())))
    assert restored.state() == original.state()
    for _ in range(3):
        batch = rng.normal(size=5)
        np.testing.assert_array_equal(restored.normalize(batch), original.normalize(batch))


def test_zscore_matches_numpy_over_everything_seen() -> None:
    rng = np.random.default_rng(2)
    z = ZScoreNormalizer(warmup=0, squash=False, clip=100.0)
    seen: list[float] = []
    for _ in range(10):
        batch = rng.normal(3.0, 2.0, size=rng.integers(1, 6))
        seen.extend(batch.tolist())
        out = z.normalize(batch)
        if len(seen) < 2:
            assert out.tolist() == [0.0] * len(batch)
            continue
        expected = (batch - np.mean(seen)) / np.std(seen)
        np.testing.assert_allclose(out, expected, atol=1e-10)


def test_zscore_squash_clip_and_warmup() -> None:
    z = ZScoreNormalizer(warmup=3)
    assert z.normalize(np.array([1.0, 5.0])).tolist() == [0.5, 0.5]
    out = z.normalize(np.array([3.0, 9.0, -9.0]))
    seen = np.array([1.0, 5.0, 3.0, 9.0, -9.0])
    zs = (np.array([3.0, 9.0, -9.0]) - seen.mean()) / seen.std()
    expected = [0.5 * (1 + math.erf(v / math.sqrt(2))) for v in zs]
    np.testing.assert_allclose(out, expected, atol=1e-12)
    assert out[2] < out[0] < out[1]
    clipped = ZScoreNormalizer(warmup=0, squash=False, clip=0.5)
    assert clipped.normalize(np.array([0.0, 10.0])).tolist() == [-0.5, 0.5]
    constant = ZScoreNormalizer(warmup=0)
    assert constant.normalize(np.array([2.0, 2.0, 2.0])).tolist() == [0.5, 0.5, 0.5]


def test_bad_normaliser_settings_and_state_name_the_field() -> None:
    cases = [
        (lambda: QuantileNormalizer(window=1), "window"),
        (lambda: QuantileNormalizer(window=10, warmup=11), "warmup"),
        (lambda: ZScoreNormalizer(clip=0.0), "clip"),
        (lambda: ZScoreNormalizer(warmup=-1), "warmup"),
        (lambda: QuantileNormalizer().normalize(np.array([1.0, np.nan])), "raw"),
        (lambda: QuantileNormalizer.from_state({"kind": "zscore"}), "kind"),
        (lambda: QuantileNormalizer.from_state({"kind": "quantile", "window": 4}), "warmup"),
        (
            lambda: QuantileNormalizer.from_state(
                {"kind": "quantile", "window": 2, "warmup": 0, "seen": 3, "values": [1, 2, 3]}
            ),
            "values",
        ),
        (lambda: ZScoreNormalizer.from_state({**ZScoreNormalizer().state(), "m2": -1.0}), "m2"),
    ]
    for call, field in cases:
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.field == field
