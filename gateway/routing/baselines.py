"""Baselines behind the same :class:`~gateway.routing.policies.Policy` interface.

Single-RM: ``random``, ``best-single``, ``laser`` (batch-level LinUCB). Ask-all (``calls_per_pair``
= N): ``majority`` (vote), ``uwo`` (mean minus lam * variance), ``oracle`` (max margin; needs
labels, an upper bound and not a deployable router).

>>> import numpy as np
>>> majority = MajorityPolicy(n_rms=3, dim=2, rng=np.random.default_rng(0))
>>> majority.combine(np.array([[0.2, -1.0, 3.0]])).tolist()
[1.0]
"""

from __future__ import annotations

import numpy as np

from gateway.routing.config import LaserConfig, UwoConfig, check_array, check_int
from gateway.routing.policies import Policy, Selection, first_only
from reward_router.errors import ConfigError


class RandomPolicy(Policy):
    """``random``: a uniformly random RM per pair; the ranking is a random permutation."""

    name = "random"

    def select(self, contexts: np.ndarray, askable: np.ndarray | None = None) -> Selection:
        b = self._check_contexts(contexts).shape[0]
        ranking = self.rng.permuted(np.tile(np.arange(self.n_rms), (b, 1)), axis=1)
        return Selection(ranking, first_only(ranking))


class BestSinglePolicy(Policy):
    """``best-single``: always ``best_rm`` (the RM best on the training folds); the other RMs
    follow in ``fallback`` order (by index when not given), for when it is down or, for a
    verifier, has no reference to judge by."""

    name = "best-single"

    def __init__(
        self,
        n_rms: int,
        dim: int,
        rng: np.random.Generator,
        best_rm: int,
        fallback: np.ndarray | None = None,
    ) -> None:
        super().__init__(n_rms, dim, rng)
        self.best_rm = check_int("best_rm", best_rm, low=0, high=n_rms - 1)
        if fallback is not None and sorted(fallback.tolist()) != list(range(n_rms)):
            raise ConfigError("fallback", f"must list each of the {n_rms} RMs once")
        order = range(n_rms) if fallback is None else fallback.tolist()
        others = [int(n) for n in order if n != self.best_rm]
        self._order = np.array([self.best_rm, *others], dtype=np.int64)

    def select(self, contexts: np.ndarray, askable: np.ndarray | None = None) -> Selection:
        b = self._check_contexts(contexts).shape[0]
        ranking = np.tile(self._order, (b, 1))
        return Selection(ranking, first_only(ranking))


class AskAllPolicy(Policy):
    """Base of the policies that ask every RM for every pair."""

    def __init__(self, n_rms: int, dim: int, rng: np.random.Generator) -> None:
        super().__init__(n_rms, dim, rng)
        self.calls_per_pair = float(n_rms)

    def select(self, contexts: np.ndarray, askable: np.ndarray | None = None) -> Selection:
        b = self._check_contexts(contexts).shape[0]
        ranking = np.tile(np.arange(self.n_rms), (b, 1))
        return Selection(ranking, np.ones((b, self.n_rms), dtype=bool))


class MajorityPolicy(AskAllPolicy):
    """``majority``: asks all N; combine = the vote, sum of the signs of the answers (0 = tie)."""

    name = "majority"

    def combine(self, margins: np.ndarray) -> np.ndarray:
        margins = self._check_margins(margins)
        present = ~np.isnan(margins)
        votes = np.sign(np.where(present, margins, 0.0)).sum(axis=1)
        return np.where(present.any(axis=1), votes, np.nan)


class UwoPolicy(AskAllPolicy):
    """``uwo`` (uncertainty-weighted optimisation): asks all N; with m_n = margin_n / scale_n,
    combine = ``sign(mean) * max(|mean| - lam * var, 0)`` over the RMs that answered (population
    variance): disagreement shrinks the label toward a tie, never flips it.

    ``margin_scales`` (N,) > 0 (default ones) put RMs on comparable scales. An RM that only gives
    a decision should be passed as a margin of +1/-1 with scale 1.

    >>> uwo = UwoPolicy(n_rms=2, dim=1, rng=np.random.default_rng(0), config=UwoConfig(lam=1.0))
    >>> uwo.combine(np.array([[1.0, 3.0], [1.0, -1.0]])).tolist()
    [1.0, 0.0]
    """

    name = "uwo"

    def __init__(
        self,
        n_rms: int,
        dim: int,
        rng: np.random.Generator,
        margin_scales: np.ndarray | None = None,
        config: UwoConfig | None = None,
    ) -> None:
        super().__init__(n_rms, dim, rng)
        self.config = config or UwoConfig()
        scales = np.ones(n_rms) if margin_scales is None else margin_scales
        self.margin_scales = check_array("margin_scales", scales, (n_rms,)).copy()
        if (self.margin_scales <= 0).any():
            raise ConfigError(
                "margin_scales", f"must all be in (0, inf), got {self.margin_scales.tolist()}"
            )

    def combine(self, margins: np.ndarray) -> np.ndarray:
        margins = self._check_margins(margins) / self.margin_scales
        present = ~np.isnan(margins)
        count = present.sum(axis=1)
        safe = np.maximum(count, 1)
        values = np.where(present, margins, 0.0)
        mean = values.sum(axis=1) / safe
        var = (np.where(present, margins - mean[:, None], 0.0) ** 2).sum(axis=1) / safe
        out = np.sign(mean) * np.maximum(np.abs(mean) - self.config.lam * var, 0.0)
        return np.where(count > 0, out, np.nan)


class OraclePolicy(AskAllPolicy):
    """``oracle``: asks all N and takes the max margin: with margins oriented so that positive
    means correct, the pair is right if any RM is right. Needs the labels; an upper bound."""

    name = "oracle"
    requires_labels = True

    def combine(self, margins: np.ndarray) -> np.ndarray:
        margins = self._check_margins(margins)
        present = ~np.isnan(margins)
        best = np.where(present, margins, -np.inf).max(axis=1, initial=-np.inf)
        return np.where(present.any(axis=1), best, np.nan)


class LaserPolicy(Policy):
    """``laser`` (LASeR): batch-level LinUCB. One RM for the whole batch, chosen by
    ``theta_n^T x + alpha * sqrt(x^T A_n^{-1} x)`` with x the mean of the batch's contexts;
    learns from the batch's mean context and mean reward (per RM, if a fallback split the batch).
    ``A_n`` starts at ``ridge * I``. Exact ties (e.g. at the start) are broken at random.
    """

    name = "laser"
    learns_online = True

    def __init__(
        self, n_rms: int, dim: int, rng: np.random.Generator, config: LaserConfig | None = None
    ) -> None:
        super().__init__(n_rms, dim, rng)
        self.config = config or LaserConfig()
        self.design = np.broadcast_to(self.config.ridge * np.eye(dim), (n_rms, dim, dim)).copy()
        self.target = np.zeros((n_rms, dim))

    def ucb(self, context: np.ndarray) -> np.ndarray:
        """The upper confidence bound of each RM at one context ``x`` (D,), (N,)."""
        rhs = np.stack([self.target, np.broadcast_to(context, self.target.shape)], axis=2)
        solved = np.linalg.solve(self.design, rhs)  # A^{-1} [b, x] per RM
        theta, a_inv_x = solved[:, :, 0], solved[:, :, 1]
        width = np.sqrt(np.maximum(a_inv_x @ context, 0.0))
        return np.asarray(theta @ context + self.config.alpha * width)

    def select(self, contexts: np.ndarray, askable: np.ndarray | None = None) -> Selection:
        contexts = self._check_contexts(contexts)
        b = contexts.shape[0]
        if b == 0:
            empty = np.zeros((0, self.n_rms), dtype=np.int64)
            return Selection(empty, first_only(empty))
        ucb = self.ucb(contexts.mean(axis=0))
        # Highest UCB first; the random secondary key only matters on exact ties.
        order = np.lexsort((self.rng.random(self.n_rms), -ucb))
        ranking = np.tile(order, (b, 1))
        return Selection(ranking, first_only(ranking))

    def update(
        self,
        contexts: np.ndarray,
        arms: np.ndarray,
        rewards: np.ndarray,
        weight: float | np.ndarray = 1.0,
    ) -> None:
        # LASeR's LinUCB has no notion of a weaker signal: every batch reward counts fully.
        contexts, arms, rewards = self._check_feedback(contexts, arms, rewards)
        for arm in np.unique(arms):
            rows = arms == arm
            x = contexts[rows].mean(axis=0)
            self.design[arm] += np.outer(x, x)
            self.target[arm] += rewards[rows].mean() * x
