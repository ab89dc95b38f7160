"""Replay evaluation: every routing policy measured on what real reward models said.

A behaviour matrix says, for each pair and each RM, whether that RM preferred the chosen
response. Replaying the pairs in a seeded random order, letting a policy pick RM(s) per pair and
reading the picked RM's ``correct`` gives the label quality that policy would have produced,
without running any reward model.

The evaluation is cross-fitted: pairs are split into ``folds`` by ``group`` (never by row); for
each fold the offline router, best-single and UWO's margin scales are fitted on the other folds
only, then the held-out pairs stream in batches. Online policies learn from the picked RM's
correctness, flipped with probability ``reward_noise`` to model a noisy −DPO signal. Every seed
re-draws the folds, the stream order and the policies' randomness.

>>> result = run_replay(matrix, features, ReplayConfig(folds=5, seeds=5))   # doctest: +SKIP
>>> result.to_json()["policies"]["bayesian"]["accuracy"]                   # doctest: +SKIP
0.77
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.routing import POLICY_NAMES, make_policy
from reward_router.data import BehaviorMatrix
from reward_router.errors import ConfigError

#: Policies whose prior comes from the offline router (the others need no router at all).
USES_ROUTER = frozenset({"bayesian", "bayesian-no-online", "weighted-score"})

#: Called after each (seed, fold) with (done, total, message).
ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ReplayConfig:
    """What a replay run does; every field is validated at construction.

    ``policy_params`` maps a policy name to keyword parameters for ``make_policy``
    (e.g. ``{"bayesian": {"lambda0": 2.0}}``). The offline router's own parameters belong to
    the fitter (:func:`torch_router_fitter`), not here.
    """

    folds: int = 5
    seeds: int = 5
    batch_size: int = 8
    reward_noise: float = 0.0
    policies: tuple[str, ...] = POLICY_NAMES
    policy_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError("folds", f"must be >= 2 (cross-fitting), got {self.folds}")
        if self.seeds < 1:
            raise ConfigError("seeds", f"must be >= 1, got {self.seeds}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.reward_noise <= 0.5:
            raise ConfigError("reward_noise", f"must be in [0, 0.5], got {self.reward_noise}")
        if not self.policies:
            raise ConfigError("policies", "at least one policy is needed")
        for name in (*self.policies, *self.policy_params):
            if name not in POLICY_NAMES:
                raise ConfigError("policies", f"unknown policy {name!r}; known: {POLICY_NAMES}")


def parse_policies(spec: str) -> tuple[str, ...]:
    """``"all"`` or a comma-separated list of policy names, validated.

    >>> parse_policies("bayesian, random")
    ('bayesian', 'random')
    """
    if spec.strip() == "all":
        return POLICY_NAMES
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    for name in names:
        if name not in POLICY_NAMES:
            raise ConfigError("policies", f"unknown policy {name!r}; known: all, {POLICY_NAMES}")
    if not names:
        raise ConfigError("policies", "empty list")
    return names


def group_folds(groups: Sequence[str], folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index per row; rows of one group always share a fold, folds balanced by rows."""
    unique = sorted(set(groups))
    if len(unique) < folds:
        raise ConfigError("folds", f"{folds} folds need at least {folds} groups, got {len(unique)}")
    order = rng.permutation(len(unique))
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    load = np.zeros(folds, dtype=np.int64)
    fold_of: dict[str, int] = {}
    # Greedy: each group (in random order) to the currently smallest fold.
    for i in order:
        g = unique[i]
        k = int(np.argmin(load))
        fold_of[g] = k
        load[k] += sizes[g]
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def oriented_margins(matrix: BehaviorMatrix) -> np.ndarray:
    """Margins oriented so that > 0 means "preferred the chosen response".

    The sign always agrees with ``correct`` (a tie is 0); the magnitude is the RM's score
    margin where it has scores and 1 where it only gives a decision.
    """
    magnitude = np.where(np.isnan(matrix.margins), 1.0, np.abs(matrix.margins))
    magnitude = np.maximum(magnitude, 1e-12)
    return (2.0 * matrix.correct - 1.0) * magnitude


def margin_scales(margins: np.ndarray) -> np.ndarray:
    """Per-RM scale (root mean square of its margins) so that RMs become comparable."""
    scale = np.sqrt(np.mean(margins**2, axis=0))
    return np.where(scale > 0, scale, 1.0)


@dataclass
class PolicyTrace:
    """What one policy produced over every (seed, fold): per-pair quality and RM calls."""

    quality: list[np.ndarray] = field(default_factory=list)  # per seed: (P,) in stream order
    rows: list[np.ndarray] = field(default_factory=list)  # per seed: (P,) matrix rows
    calls: list[float] = field(default_factory=list)  # per seed: total RM calls
    picks: list[np.ndarray] = field(default_factory=list)  # per seed: (N,) picks per RM
    streams: list[np.ndarray] = field(default_factory=list)  # per (seed, fold): stream quality


@dataclass
class ReplayResult:
    """Everything a replay measured; ``to_json`` gives the documented output shape."""

    n_pairs: int
    rms: list[str]
    folds: int
    seeds: int
    domains: list[str]
    traces: dict[str, PolicyTrace]
    router_valid_accuracy: list[float] = field(default_factory=list)

    def accuracy(self, policy: str) -> np.ndarray:
        """Accuracy per seed (a tie counts as half)."""
        return np.array([q.mean() for q in self.traces[policy].quality])

    def by_domain(self, policy: str) -> dict[str, float]:
        trace = self.traces[policy]
        out: dict[str, float] = {}
        for domain in sorted(set(self.domains)):
            per_seed = []
            for q, rows in zip(trace.quality, trace.rows, strict=True):
                mask = np.array([self.domains[r] == domain for r in rows])
                per_seed.append(q[mask].mean())
            out[domain] = float(np.mean(per_seed))
        return out

    def calls_per_pair(self, policy: str) -> float:
        return float(np.mean(self.traces[policy].calls) / self.n_pairs)

    def pick_share(self, policy: str) -> np.ndarray:
        picks = np.sum(self.traces[policy].picks, axis=0).astype(np.float64)
        total = picks.sum()
        return picks / total if total > 0 else picks

    def to_json(self) -> dict[str, Any]:
        return {
            "pairs": self.n_pairs,
            "rms": list(self.rms),
            "folds": self.folds,
            "seeds": self.seeds,
            "policies": {
                name: {
                    "accuracy": float(self.accuracy(name).mean()),
                    "accuracy_std": float(self.accuracy(name).std()),
                    "rm_calls_per_pair": self.calls_per_pair(name),
                    "by_domain": self.by_domain(name),
                }
                for name in self.traces
            },
        }

    def cumulative_accuracy(self, policy: str) -> np.ndarray:
        """Running accuracy along a held-out stream, averaged over every (seed, fold) stream.

        Streams differ in length by a few pairs (folds are balanced by group); the curve is
        cut to the shortest one.
        """
        streams = self.traces[policy].streams
        n = min(len(q) for q in streams)
        runs = [np.cumsum(q[:n]) / np.arange(1, n + 1) for q in streams]
        return np.asarray(np.mean(runs, axis=0))


@dataclass(frozen=True)
class FittedRouter:
    """What the replay needs of an offline router fitted on one fold's training rows.

    ``lambda0`` / ``sigma2`` are the prior strength fitted with it (``None``: use the policy
    defaults); they apply to the policies that inject the prior, unless the user sets them.
    """

    contexts: Callable[[np.ndarray], np.ndarray]
    prior_means: np.ndarray
    valid_accuracy: float
    lambda0: float | None = None
    sigma2: float | None = None


#: Fits an offline router on (features, correct, groups, seed) of the training rows.
RouterFitter = Callable[[np.ndarray, np.ndarray, list[str], int], FittedRouter]


def _stream_policy(
    name: str,
    params: Mapping[str, Any],
    contexts: np.ndarray,
    rows: np.ndarray,
    correct: np.ndarray,
    margins: np.ndarray,
    *,
    prior_means: np.ndarray | None,
    best_rm: int,
    scales: np.ndarray,
    batch_size: int,
    reward_noise: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Stream ``rows`` (already in stream order) through one fresh policy.

    Returns per-pair quality, RM calls made and picks per RM.
    """
    n_rms = correct.shape[1]
    policy = make_policy(
        name,
        n_rms=n_rms,
        dim=contexts.shape[1],
        rng=rng,
        prior_means=prior_means,
        best_rm=best_rm,
        margin_scales=scales,
        **dict(params),
    )
    quality = np.empty(len(rows))
    picks = np.zeros(n_rms, dtype=np.int64)
    calls = 0.0
    for start in range(0, len(rows), batch_size):
        sl = slice(start, start + batch_size)
        batch_rows = rows[sl]
        ctx = contexts[sl]
        selection = policy.select(ctx)
        asked = selection.asked
        calls += float(asked.sum())
        if policy.calls_per_pair == 1.0:
            arms = selection.ranking[:, 0]
            q = correct[batch_rows, arms]
            np.add.at(picks, arms, 1)
            rewards = q.copy()
            if reward_noise > 0:
                flip = rng.random(len(q)) < reward_noise
                rewards[flip] = 1.0 - rewards[flip]
            policy.update(ctx, arms, rewards)
        else:
            masked = np.where(asked, margins[batch_rows], np.nan)
            combined = policy.combine(masked)
            q = np.where(combined > 0, 1.0, np.where(combined < 0, 0.0, 0.5))
            picks += asked.sum(axis=0)
        quality[sl] = q
    return quality, calls, picks


def _policy_params(
    name: str, user: Mapping[str, Any], fitted: FittedRouter | None
) -> dict[str, Any]:
    """The user's parameters, plus the fitted prior strength for the full Bayesian router.

    Only ``bayesian`` takes the fitted lambda0 / sigma2: the ablations keep the policy
    defaults, so that they measure what their name says and nothing more.
    """
    params = dict(user)
    if name == "bayesian" and fitted is not None:
        if fitted.lambda0 is not None:
            params.setdefault("lambda0", fitted.lambda0)
        if fitted.sigma2 is not None:
            params.setdefault("sigma2", fitted.sigma2)
    return params


def run_replay(
    matrix: BehaviorMatrix,
    features: np.ndarray,
    config: ReplayConfig,
    fit_router: RouterFitter,
    progress: ProgressFn | None = None,
) -> ReplayResult:
    """Cross-fitted replay of ``config.policies`` over ``matrix``.

    ``features[i]`` are the pair features of ``matrix.pairs[i]``; ``fit_router`` fits the
    offline router on training rows (see :func:`torch_router_fitter`), so this loop stays free
    of torch and can be tested with any fitter.
    """
    if features.shape[0] != matrix.n_pairs:
        raise ConfigError("features", f"{features.shape[0]} rows for {matrix.n_pairs} pairs")
    margins = oriented_margins(matrix)
    groups = [p.group for p in matrix.pairs]
    traces = {name: PolicyTrace() for name in config.policies}
    need_router = bool(USES_ROUTER & set(config.policies))
    valid_accs: list[float] = []
    total_steps = config.seeds * config.folds
    step = 0
    root = np.random.SeedSequence(config.seed)
    for seed_seq in root.spawn(config.seeds):
        split_rng, *policy_seeds = (
            np.random.default_rng(s) for s in seed_seq.spawn(1 + len(config.policies))
        )
        fold_of = group_folds(groups, config.folds, split_rng)
        seed_quality = {name: np.empty(0) for name in config.policies}
        seed_rows = {name: np.empty(0, dtype=np.int64) for name in config.policies}
        seed_calls = dict.fromkeys(config.policies, 0.0)
        seed_picks = {name: np.zeros(matrix.n_rms, dtype=np.int64) for name in config.policies}
        for k in range(config.folds):
            train = np.flatnonzero(fold_of != k)
            test = split_rng.permutation(np.flatnonzero(fold_of == k))
            best_rm = int(np.argmax(matrix.correct[train].mean(axis=0)))
            scales = margin_scales(margins[train])
            fitted: FittedRouter | None = None
            if need_router:
                router_seed = int(split_rng.integers(2**31))
                fitted = fit_router(
                    features[train], matrix.correct[train], [groups[i] for i in train], router_seed
                )
                contexts = fitted.contexts(features[test])
                valid_accs.append(fitted.valid_accuracy)
            else:
                contexts = np.ones((len(test), 1))
            # Every policy sees the same contexts (the router's h when a router was fitted):
            # laser's batch context is their mean; the no-offline ablation keeps h but drops
            # the prior mean; ensembles and baselines ignore them.
            for name, prng in zip(config.policies, policy_seeds, strict=True):
                injects = fitted is not None and name in USES_ROUTER
                q, calls, picks = _stream_policy(
                    name,
                    _policy_params(name, config.policy_params.get(name, {}), fitted),
                    contexts,
                    test,
                    matrix.correct,
                    margins,
                    prior_means=fitted.prior_means if fitted is not None and injects else None,
                    best_rm=best_rm,
                    scales=scales,
                    batch_size=config.batch_size,
                    reward_noise=config.reward_noise,
                    rng=prng,
                )
                seed_quality[name] = np.concatenate([seed_quality[name], q])
                seed_rows[name] = np.concatenate([seed_rows[name], test])
                seed_calls[name] += calls
                seed_picks[name] += picks
                traces[name].streams.append(q)
            step += 1
            if progress is not None:
                progress(step, total_steps, f"fold {k + 1}/{config.folds}")
        for name in config.policies:
            traces[name].quality.append(seed_quality[name])
            traces[name].rows.append(seed_rows[name])
            traces[name].calls.append(seed_calls[name])
            traces[name].picks.append(seed_picks[name])
    return ReplayResult(
        n_pairs=matrix.n_pairs,
        rms=list(matrix.rms),
        folds=config.folds,
        seeds=config.seeds,
        domains=[p.domain for p in matrix.pairs],
        traces=traces,
        router_valid_accuracy=valid_accs,
    )


def torch_router_fitter(
    router_params: Mapping[str, Any] | None = None,
    valid_fraction: float = 0.2,
    calibrate: bool = True,
) -> RouterFitter:
    """A :data:`RouterFitter` that trains the real offline router (torch) on each fold.

    With ``calibrate`` (the default) the policies get the router's calibrated prior and its
    evidence-fitted strength (``OfflineRouter.prior_fit``, measured on the router's held-out
    rows, see :mod:`gateway.routing.prior`); without it ``E_bt`` is injected raw, as in the
    paper, with the policies' default strength.
    """
    from gateway.offline.router import RouterConfig, train_router

    params = dict(router_params or {})

    def fit(
        features: np.ndarray, correct: np.ndarray, groups: list[str], seed: int
    ) -> FittedRouter:
        config = RouterConfig(**{**params, "seed": seed})
        rms = [f"rm{n}" for n in range(correct.shape[1])]
        router, report = train_router(
            features, correct, rms, config, groups=groups, valid_fraction=valid_fraction
        )
        prior = router.prior_fit if calibrate else None
        return FittedRouter(
            contexts=router.hidden,
            prior_means=router.prior_means if prior is not None else router.bt_means,
            valid_accuracy=report.valid_routing_acc,
            lambda0=prior.lambda0 if prior is not None else None,
            sigma2=prior.sigma2 if prior is not None else None,
        )

    return fit
