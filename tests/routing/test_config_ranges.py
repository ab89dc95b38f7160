"""The policies' float parameters have ranges inside which the math holds (issue 7, bad input).

Regression: ``lambda0: 5e-324`` was accepted and left a precision matrix that was not positive
definite after the first feedback (every later call of the namespace failed), ``sigma2: 5e-324``
made the posterior means NaN, and ``laser`` with ``ridge: 5e-324`` raised numpy's LinAlgError
(a 500 through the gateway). Values outside the range now fail when the config is built, naming
the field and the range; values at the ends of the range keep working under feedback.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gateway.routing import make_policy, with_intercept
from gateway.routing.config import MAX_WEIGHT, SCALE_RANGE
from reward_router.errors import ConfigError

N, D = 3, 8
LOW, HIGH = SCALE_RANGE
TINY = 5e-324  # the smallest positive float (a subnormal)


def build(name: str, **params: Any) -> Any:
    return make_policy(
        name,
        n_rms=N,
        dim=D,
        rng=np.random.default_rng(0),
        prior_means=np.zeros((N, D)),
        margin_scales=np.ones(N),
        **params,
    )


OUT_OF_RANGE: list[tuple[str, str, float]] = [
    (policy, param, value)
    for policy in ("bayesian", "bayesian-no-offline", "weighted-score")
    for param in ("lambda0", "sigma2")
    for value in (TINY, LOW / 10, HIGH * 10, 1e308)
]
OUT_OF_RANGE += [("laser", "ridge", v) for v in (TINY, LOW / 10, HIGH * 10)]
OUT_OF_RANGE += [("laser", "alpha", v) for v in (MAX_WEIGHT * 10, 1e308)]
OUT_OF_RANGE += [("uwo", "lam", v) for v in (MAX_WEIGHT * 10, 1e308)]


@pytest.mark.parametrize(("policy", "param", "value"), OUT_OF_RANGE)
def test_values_outside_the_range_fail_naming_the_field(
    policy: str, param: str, value: float
) -> None:
    with pytest.raises(ConfigError) as info:
        build(policy, **{param: value})
    assert info.value.field == param
    high = "1e+06"
    low = "0.001" if param in ("lambda0", "sigma2", "ridge") else "0"
    assert f"{param}: must be a finite number in [{low}, {high}], got {value!r}" == str(info.value)


@pytest.mark.parametrize(
    ("policy", "params"),
    [
        ("bayesian", {"lambda0": LOW, "sigma2": LOW}),
        ("bayesian", {"lambda0": HIGH, "sigma2": HIGH}),
        ("bayesian", {"lambda0": LOW, "sigma2": HIGH}),
        ("bayesian", {"lambda0": HIGH, "sigma2": LOW}),
        ("bayesian", {"lambda0": LOW, "sigma2": LOW, "forgetting": TINY}),
        ("weighted-score", {"lambda0": LOW, "sigma2": LOW, "alpha": 0.0}),
        ("laser", {"ridge": LOW, "alpha": MAX_WEIGHT}),
        ("laser", {"ridge": HIGH, "alpha": 0.0}),
    ],
)
def test_the_ends_of_the_ranges_survive_much_repeated_feedback(
    policy: str, params: dict[str, Any]
) -> None:
    """The worst case for the precision: 20,000 observations of the same two contexts (one
    prompt asked again and again), rewards at the gateway's extremes (|reward| <= 1e6 with the
    ``none`` normaliser). Every later select works and every score stays finite."""
    p = build(policy, **params)
    rng = np.random.default_rng(1)
    direction = rng.normal(size=D - 1)
    direction /= np.linalg.norm(direction)
    for _ in range(20):
        signs = rng.choice([-1.0, 1.0], size=(1000, 1))
        h = with_intercept(signs * direction)
        chosen = p.select(h).chosen
        p.update(h, chosen, rng.choice([-1e6, 0.0, 1e6], size=1000))
    h = with_intercept(rng.normal(size=(5, D - 1)))
    ranking = p.select(h).ranking
    assert sorted(ranking[0].tolist()) == list(range(N))
    if policy == "laser":
        assert np.isfinite(p.ucb(h.mean(axis=0))).all()
    else:
        assert np.isfinite(p.scores(h)).all()
        post = p.posteriors
        assert np.isfinite(post.means()).all()
        assert (post.variances(h) >= 0).all() and np.isfinite(post.variances(h)).all()
