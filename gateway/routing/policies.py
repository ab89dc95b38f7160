"""The policy interface, and the Bayesian router with its ablations.

A policy turns a batch of pair contexts h (B, D) into a :class:`Selection` (which RMs to ask,
best-first order for fallback), learns from rewards in [0, 1] (``update``), and combines the
margins of the RMs it asked into one margin per pair (``combine``).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> policy = BayesianPolicy(n_rms=3, dim=2, rng=rng, prior_means=np.zeros((3, 2)))
>>> sel = policy.select(np.array([[0.0, 1.0], [1.0, 1.0]]))
>>> sel.ranking.shape, sel.asked.sum(axis=1).tolist()
((2, 3), [1, 1])
>>> policy.update(np.array([[0.0, 1.0]]), sel.chosen[:1], np.array([1.0]))
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from gateway.routing.config import (
    DEFAULT_LAMBDA0,
    BayesianConfig,
    NoOfflineConfig,
    PaperConfig,
    WeightedScoreConfig,
    check_arms,
    check_array,
    check_int,
)
from gateway.routing.posterior import GaussianPosteriors
from reward_router.errors import ConfigError


@dataclass(frozen=True, eq=False)  # arrays: compare fields with numpy, not ==
class Selection:
    """What a policy decided for a batch.

    ``ranking`` (B, N) int: RMs best-first for this draw; column 0 is the RM a single-RM policy
    asks, the rest is the fallback order. ``asked`` (B, N) bool: which RMs are asked per pair.

    >>> s = Selection(np.array([[2, 0, 1]]), np.array([[False, False, True]]))
    >>> s.chosen.tolist()
    [2]
    """

    ranking: np.ndarray
    asked: np.ndarray

    @property
    def chosen(self) -> np.ndarray:
        """The first-ranked RM per pair, (B,)."""
        return self.ranking[:, 0]


def first_only(ranking: np.ndarray) -> np.ndarray:
    """``asked`` mask for single-RM policies: only the first-ranked RM of each pair."""
    asked = np.zeros(ranking.shape, dtype=bool)
    if ranking.size:
        asked[np.arange(ranking.shape[0]), ranking[:, 0]] = True
    return asked


def askable_mask(needs_reference: np.ndarray, has_reference: np.ndarray) -> np.ndarray:
    """(B, N) bool: RM n can judge pair i unless it needs a reference (``needs_reference``,
    (N,)) and the pair has none (``has_reference``, (B,)).

    >>> askable_mask(np.array([False, True]), np.array([True, False])).tolist()
    [[True, True], [True, False]]
    """
    return ~(np.asarray(needs_reference, bool)[None, :] & ~np.asarray(has_reference, bool)[:, None])


def askable_last(ranking: np.ndarray, askable: np.ndarray) -> np.ndarray:
    """``ranking`` (B, N) with the RMs that cannot judge a pair (``askable`` (B, N) False) moved
    last, in their order: such an RM (a verifier without a reference) could only abstain, a tie
    that teaches the trainer nothing. The choice is then the best of the others under the same
    draw.

    >>> askable_last(np.array([[2, 0, 1]]), np.array([[True, True, False]])).tolist()
    [[0, 1, 2]]
    """
    if askable.all():
        return ranking
    demote = ~np.take_along_axis(askable, ranking, axis=1)
    return np.take_along_axis(ranking, np.argsort(demote, axis=1, kind="stable"), axis=1)


def reference_last(
    ranking: np.ndarray, needs_reference: np.ndarray, has_reference: np.ndarray
) -> np.ndarray:
    """:func:`askable_last` for RMs that need a reference (``needs_reference``, (N,) bool) and
    pairs that have one or not (``has_reference``, (B,) bool).

    >>> reference_last(np.array([[2, 0, 1], [2, 1, 0]]), np.array([False, False, True]),
    ...                np.array([False, True])).tolist()
    [[0, 1, 2], [2, 1, 0]]
    """
    return askable_last(ranking, askable_mask(needs_reference, has_reference))


def rank_desc(scores: np.ndarray) -> np.ndarray:
    """RM indices sorted by score, highest first; ties keep the lower index first."""
    return np.argsort(-scores, axis=1, kind="stable")


def require_prior(policy: str, prior_means: np.ndarray | None, n_rms: int, dim: int) -> np.ndarray:
    """``prior_means`` as a finite (n_rms, dim) array (a copy); ``policy`` requires it."""
    if prior_means is None:
        raise ConfigError(
            "prior_means",
            f"is required for policy {policy!r}: an array of shape ({n_rms}, {dim}), "
            "the offline router's prior_means",
        )
    return check_array("prior_means", prior_means, (n_rms, dim)).copy()


class Policy(ABC):
    """A routing policy over ``n_rms`` RMs and ``dim``-dimensional contexts.

    Subclasses set ``name``, ``calls_per_pair``, ``requires_labels`` and ``learns_online``, and
    implement :meth:`select`; learning policies override :meth:`update`, multi-RM ones
    :meth:`combine`.
    """

    name: str = ""
    calls_per_pair: float = 1.0
    requires_labels: bool = False
    learns_online: bool = False

    def __init__(self, n_rms: int, dim: int, rng: np.random.Generator) -> None:
        self.n_rms = check_int("n_rms", n_rms, low=1)
        self.dim = check_int("dim", dim, low=1)
        if not isinstance(rng, np.random.Generator):
            raise ConfigError("rng", f"must be a numpy.random.Generator, got {type(rng).__name__}")
        self.rng = rng

    @abstractmethod
    def select(self, contexts: np.ndarray, askable: np.ndarray | None = None) -> Selection:
        """Decide, for each pair (row of ``contexts``, (B, D)), which RMs to ask.

        ``askable`` (B, N) bool, optional: which RMs can judge each pair at all (a verifier
        cannot without a reference, :func:`askable_mask`). A policy that weighs RMs against
        one another (``bayesian``: explore only what can beat the best *askable* RM) uses it;
        the ranking may still list the others, and callers put them last
        (:func:`askable_last`)."""

    def update(
        self,
        contexts: np.ndarray,
        arms: np.ndarray,
        rewards: np.ndarray,
        weight: float | np.ndarray = 1.0,
    ) -> None:
        """Learn from rewards of the RMs ``arms`` (B,) asked on ``contexts`` (B, D).

        Rewards are on the correctness scale (P(label right), see
        :class:`~gateway.routing.prior.RewardLink`); ``weight`` is what one of them is worth in
        correctness observations (1 for correctness itself; one per observation or one for
        all). The base checks the inputs and
        learns nothing (the non-learning baselines).
        """
        self._check_feedback(contexts, arms, rewards)

    def combine(self, margins: np.ndarray) -> np.ndarray:
        """Aggregate margin "a over b" per pair from ``margins`` (B, N), NaN where not asked.

        Single-RM policies return the asked RM's margin (the first one present if a fallback
        left several), NaN if none answered.

        >>> policy = NoOnlinePolicy(3, 1, np.random.default_rng(0), np.zeros((3, 1)))
        >>> policy.combine(np.array([[np.nan, 0.3, np.nan], [np.nan] * 3])).tolist()
        [0.3, nan]
        """
        margins = self._check_margins(margins)
        present = ~np.isnan(margins)
        first = np.argmax(present, axis=1)
        out = margins[np.arange(margins.shape[0]), first]
        out[~present.any(axis=1)] = np.nan
        return out

    # ---- shared checks -------------------------------------------------------------------

    def _check_margins(self, margins: np.ndarray) -> np.ndarray:
        """``margins`` as float64 (B, N); NaN marks an RM not asked, so only NaN is allowed."""
        try:
            array: np.ndarray = np.asarray(margins, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ConfigError("margins", "must be a numeric (B, N) array") from exc
        if array.ndim != 2 or array.shape[1] != self.n_rms:
            raise ConfigError("margins", f"must have shape (B, {self.n_rms}), got {array.shape}")
        if np.isinf(array).any():
            raise ConfigError("margins", "must be finite or NaN (not asked), found inf")
        return array

    def _check_contexts(self, contexts: np.ndarray) -> np.ndarray:
        return check_array("contexts", contexts, (None, self.dim))

    def _check_feedback(
        self, contexts: np.ndarray, arms: np.ndarray, rewards: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        contexts = self._check_contexts(contexts)
        b = contexts.shape[0]
        return (
            contexts,
            check_arms("arms", arms, self.n_rms, b),
            check_array("rewards", rewards, (b,)),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_rms={self.n_rms}, dim={self.dim})"


class BayesianPolicy(Policy):
    """``bayesian``: the full method. Prior ``N(mu0_n, P_n^-1)`` per RM from the offline router
    (``prior_means`` on the correctness scale, ``prior_precision`` the diagonal of ``P_n``, both
    from :class:`~gateway.routing.prior.PriorFit`; ``lambda0 I`` when the config sets lambda0 or
    no fitted precision is given), one Thompson draw of h^T w_n per pair among the RMs that can
    still beat the leader (the config's ``gate_z``: ``explore_z`` with forgetting on,
    ``stationary_z`` = 0 without, i.e. the leader by posterior mean), posterior updated online.

    ``posteriors`` is the :class:`GaussianPosteriors` (assignable, so a gateway can restore a
    stored one of the same shape).
    """

    name = "bayesian"
    learns_online = True

    def __init__(
        self,
        n_rms: int,
        dim: int,
        rng: np.random.Generator,
        prior_means: np.ndarray | None,
        config: BayesianConfig | None = None,
        *,
        prior_precision: np.ndarray | None = None,
        prior_sigma2: float | np.ndarray | None = None,
    ) -> None:
        super().__init__(n_rms, dim, rng)
        self.config = config or BayesianConfig()
        means = require_prior(self.name, prior_means, n_rms, dim)
        if self.config.lambda0 is not None or prior_precision is None:
            lambda0 = self.config.lambda0 if self.config.lambda0 is not None else DEFAULT_LAMBDA0
            self._posteriors = GaussianPosteriors.from_prior(means, lambda0)
        else:
            precision = check_array("prior_precision", prior_precision, (n_rms, dim))
            self._posteriors = GaussianPosteriors.from_prior(
                means, float(precision[:, :-1].mean()), prior_precision=precision
            )
        #: the noise variance of one correctness reward per RM (N,): the config's for all RMs,
        #: else the fitted one (an RM right 97% of the time is a far less noisy coin than one
        #: right 60%), else the default
        if self.config.sigma2 is not None or prior_sigma2 is None:
            self.noise = np.full(n_rms, self.config.noise)
        else:
            noise = np.broadcast_to(np.asarray(prior_sigma2, dtype=np.float64), (n_rms,))
            self.noise = check_array("prior_sigma2", noise, (n_rms,)).copy()
            if (self.noise <= 0).any():
                raise ConfigError("prior_sigma2", "noise variances must all be > 0")
        self.sigma2 = float(self.noise.mean())
        #: the precision forgetting decays toward (N, D): the prior's, capped at the config's
        #: ``memory`` observations of each RM's noise per coordinate
        self.forget_floor = np.minimum(
            self._posteriors.prior_diag, self.config.memory / self.noise[:, None]
        )

    @property
    def posteriors(self) -> GaussianPosteriors:
        """The per-RM posteriors this policy samples from and updates."""
        return self._posteriors

    @posteriors.setter
    def posteriors(self, value: GaussianPosteriors) -> None:
        if value.n_rms != self.n_rms or value.dim != self.dim:
            raise ConfigError(
                "posteriors",
                f"must have n_rms={self.n_rms}, dim={self.dim}, got {value.n_rms}, {value.dim}",
            )
        self._posteriors = value

    def scores(self, contexts: np.ndarray) -> np.ndarray:
        """The scores this policy ranks by, (B, N): one posterior draw per pair and RM, its
        spread around the mean scaled by :meth:`exploration`."""
        means = self._posteriors.mean_scores(contexts)
        std = np.sqrt(self._posteriors.variances(contexts)) * self.exploration()
        return means + std * self.rng.standard_normal(means.shape)

    def exploration(self) -> float:
        """The share of the posterior's spread the draws use now: ``sqrt(min(1, t / ramp))``
        after ``t`` observations (``explore_ramp``; 1 when the ramp is 0)."""
        ramp = self.config.explore_ramp
        if ramp <= 0:
            return 1.0
        return float(np.sqrt(min(1.0, float(self._posteriors.counts.sum()) / ramp)))

    def select(self, contexts: np.ndarray, askable: np.ndarray | None = None) -> Selection:
        contexts = self._check_contexts(contexts)
        draws = self.scores(contexts)
        z = self.config.gate_z
        if z is None or draws.size == 0:
            ranking = rank_desc(draws)
            return Selection(ranking, first_only(ranking))
        eligible, means = self.plausible(contexts, z, askable)
        # Eligible RMs first, by their draw; the rest (the fallback order) by posterior mean.
        key = np.where(eligible, draws, means)
        ranking = np.lexsort((-key, ~eligible), axis=-1)
        return Selection(ranking, first_only(ranking))

    def plausible(
        self, contexts: np.ndarray, z: float, askable: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which RMs may still beat the leader per pair (B, N) bool, and the posterior means.

        RM n is plausible at h when ``m_n + z sqrt(v_n + v_L) >= m_L`` with ``L`` the RM of the
        highest posterior mean ``m`` and ``v`` the variances of the draws (the posterior's,
        scaled by :meth:`exploration`): exploring an RM whose draw almost never beats the
        leader's costs label accuracy now and can hardly change a later decision. With
        ``askable`` (B, N) the leader is the best askable RM and only askable RMs are
        plausible (a pair none can judge keeps every RM): a verifier that is sure on math
        pairs must not lead a chat pair it cannot judge, where every RM then looked
        implausible but the rarely asked, uncertain ones.

        >>> post = BayesianPolicy(2, 1, np.random.default_rng(0), np.array([[0.9], [0.5]]),
        ...                       BayesianConfig(lambda0=1e4, explore_ramp=0))
        >>> post.plausible(np.ones((1, 1)), 2.0)[0].tolist()
        [[True, False]]
        """
        means = self._posteriors.mean_scores(contexts)
        var = self._posteriors.variances(contexts) * self.exploration() ** 2
        rows = np.arange(means.shape[0])
        ok = np.ones(means.shape, dtype=bool)
        if askable is not None:
            ok = check_array("askable", askable, means.shape).astype(bool)
            ok = ok | ~ok.any(axis=1, keepdims=True)
        lead = np.argmax(np.where(ok, means, -np.inf), axis=1)
        gap = means - means[rows, lead][:, None]
        sd = np.sqrt(var + var[rows, lead][:, None])
        return (gap + z * sd >= 0.0) & ok, means

    def update(
        self,
        contexts: np.ndarray,
        arms: np.ndarray,
        rewards: np.ndarray,
        weight: float | np.ndarray = 1.0,
    ) -> None:
        contexts, arms, rewards = self._check_feedback(contexts, arms, rewards)
        if self.config.forgetting < 1.0 and arms.size:
            # Discount per observation, so the total forgetting does not depend on batch size;
            # a huge batch may underflow gamma^B to 0, which means "back to the prior" anyway.
            gamma = max(self.config.forgetting**arms.size, float(np.finfo(np.float64).tiny))
            self._posteriors.forget(gamma, self.forget_floor)
        # Per-RM noise as a per-observation weight against the mean noise.
        weights = weight * self.sigma2 / self.noise[arms]
        self._posteriors.observe(arms, contexts, rewards, self.sigma2, weights)


class PaperPolicy(BayesianPolicy):
    """``bayesian-paper``: the paper's recipe as a preset. ``E_bt`` injected raw as the prior
    mean (the caller passes the uncalibrated BT head), hand-set ``lambda0`` / ``sigma2``
    (:class:`~gateway.routing.config.PaperConfig`), plain Thompson sampling over every RM; the
    gateway feeds it quantile-normalised −DPO loss as the reward, with no link."""

    name = "bayesian-paper"

    def __init__(
        self,
        n_rms: int,
        dim: int,
        rng: np.random.Generator,
        prior_means: np.ndarray | None,
        config: BayesianConfig | None = None,
    ) -> None:
        super().__init__(n_rms, dim, rng, prior_means, config or PaperConfig())


class NoOfflinePolicy(BayesianPolicy):
    """``bayesian-no-offline``: the Bayesian router with a zero prior mean (``prior_means`` is
    ignored), i.e. online Thompson sampling alone: plain draws from the first pair (with no prior
    knowledge there is nothing for ``explore_z`` / ``explore_ramp`` to protect)."""

    name = "bayesian-no-offline"

    def __init__(
        self,
        n_rms: int,
        dim: int,
        rng: np.random.Generator,
        prior_means: np.ndarray | None = None,
        config: BayesianConfig | None = None,
    ) -> None:
        config = config or NoOfflineConfig()
        super().__init__(n_rms, dim, rng, np.zeros((n_rms, dim)), config)


class NoOnlinePolicy(Policy):
    """``bayesian-no-online``: the offline prior alone, never updated. Deterministic: ranks RMs by
    the prior-mean score h^T mu0_n (no draw: without updates, sampling would only add noise
    around that ranking)."""

    name = "bayesian-no-online"

    def __init__(
        self, n_rms: int, dim: int, rng: np.random.Generator, prior_means: np.ndarray | None
    ) -> None:
        super().__init__(n_rms, dim, rng)
        self.prior_means = require_prior(self.name, prior_means, n_rms, dim)

    def select(self, contexts: np.ndarray, askable: np.ndarray | None = None) -> Selection:
        ranking = rank_desc(self._check_contexts(contexts) @ self.prior_means.T)
        return Selection(ranking, first_only(ranking))


class WeightedScorePolicy(BayesianPolicy):
    """``weighted-score``: ranks by ``alpha * h^T mu0_n + (1 - alpha) * s_n`` where s_n is a
    Thompson draw from a zero-prior posterior updated online (the offline score is added, not
    injected into the prior)."""

    name = "weighted-score"

    def __init__(
        self,
        n_rms: int,
        dim: int,
        rng: np.random.Generator,
        prior_means: np.ndarray | None,
        config: WeightedScoreConfig | None = None,
    ) -> None:
        self.prior_means = require_prior(self.name, prior_means, n_rms, dim)
        self.weights = config or WeightedScoreConfig()
        super().__init__(n_rms, dim, rng, np.zeros((n_rms, dim)), self.weights)

    def select(self, contexts: np.ndarray, askable: np.ndarray | None = None) -> Selection:
        # The ablation ranks by its blended score alone (no plausibility gate: the offline part
        # is not a posterior).
        ranking = rank_desc(self.scores(self._check_contexts(contexts)))
        return Selection(ranking, first_only(ranking))

    def scores(self, contexts: np.ndarray) -> np.ndarray:
        alpha = self.weights.alpha
        online = self._posteriors.sample_scores(contexts, self.rng)
        return alpha * (contexts @ self.prior_means.T) + (1.0 - alpha) * online
