"""Building a namespace's policy from its config and the router artifact."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np

from gateway.policy_setup import build_policy
from gateway.routing.prior import fit_prior


def _router(intercepts: list[float], dim: int) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    s, c = rng.normal(size=(40, 3)), (rng.random((40, 3)) < 0.6).astype(float)
    fit = dataclasses.replace(fit_prior(s, c, s, c), intercepts=tuple(intercepts))
    return SimpleNamespace(
        prior_means=np.zeros((3, dim)), prior_precision=None, bt_means=None, prior_fit=fit
    )


def test_best_single_falls_back_by_the_routers_accuracy_as_replay_does() -> None:
    """best-single on the verifier (index 1) falls back, where the verifier cannot answer, to
    the next RM by the router's training accuracy (index 2 here), not by index."""
    built = build_policy(
        "ns",
        {"policy": "best-single", "best_rm": "verifier"},
        rm_names=["chat-rm", "verifier", "math-rm"],
        dim=4,
        router=_router([0.50, 0.63, 0.56], dim=4),
        seed=0,
    )
    ranking = built.policy.select(np.ones((2, 4))).ranking
    assert ranking.tolist() == [[1, 2, 0], [1, 2, 0]]
    plain = build_policy(
        "ns",
        {"policy": "best-single", "best_rm": "verifier"},
        rm_names=["chat-rm", "verifier", "math-rm"],
        dim=4,
        router=None,
        seed=0,
    )
    assert plain.policy.select(np.ones((1, 4))).ranking.tolist() == [[1, 0, 2]]
