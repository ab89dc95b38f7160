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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.routing import POLICY_NAMES, make_policy
from gateway.routing.normalize import QuantileNormalizer
from gateway.routing.policies import askable_last, askable_mask
from gateway.routing.prior import AuditLink, RewardLink
from gateway.routing.registry import NEEDS_PRIOR, NO_ONLINE_VARIANT, RAW_PRIOR
from reward_router.data import BehaviorMatrix
from reward_router.errors import ConfigError

#: What the online policies learn from (``--reward``): the picked RM's correctness, the same
#: flipped with probability ``reward_noise``, or a model of quantile-normalised −DPO loss.
REWARDS = ("correct", "noisy", "dpo-proxy")
#: Order of each held-out stream (``--stream-order``): a seeded shuffle; blocks by pair source
#: (a shift of the pair distribution); or a shuffle in which, halfway, the RM that was best on
#: the training folds starts answering like the worst one (an RM that breaks mid-run).
STREAM_ORDERS = ("shuffled", "by-source", "drift")
#: ``dpo-proxy``: the trained policy agrees with the true preference with a probability rising
#: along the stream from the first to the second value (the policy learns as it trains).
DPO_POLICY_AGREEMENT = (0.55, 0.75)
#: ``dpo-proxy``: the link's assumed informativeness of −DPO loss about label correctness
#: (:class:`~gateway.routing.prior.RewardLink`), the gateway's default too. Not fitted to the
#: proxy: the simulated signal's real informativeness rises from ~0.05 to ~0.3 along a stream.
DPO_INFORMATIVENESS = 0.1

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
    reward: str = "correct"
    stream_order: str = "shuffled"
    #: RM calls per pair allowed on average: above 1, a single-RM policy asks the next RM of
    #: the same draw when the chosen one ties or its |margin| (in units of that RM's typical
    #: margin) is below ``second_opinion_margin``, while the budget lasts. ``None``: the
    #: threshold is the RM's own ``max_calls_per_pair - 1`` quantile of |margin| on the
    #: training folds, so the budget goes to its least sure labels.
    max_calls_per_pair: float = 1.0
    second_opinion_margin: float | None = None
    #: gold audits: this share of ``bayesian``'s pairs is also labelled by ``audit_rm`` (default:
    #: the training-best RM); agreement, calibrated by the auditor's training accuracy, is that
    #: pair's reward instead of the ``reward`` signal
    audit_rate: float = 0.0
    audit_rm: str | None = None
    #: RMs that judge only pairs with a reference answer (a verifier; ``needs_reference`` in
    #: the gateway's RM list): as the gateway does, every single-RM policy ranks them last on
    #: the pairs that have none (``Pair.reference``), so they are asked there only when nothing
    #: else is ranked; best-single's fallback is then the next RM by training accuracy
    needs_reference: tuple[str, ...] = ()
    #: share of each fold's training groups the offline stage sees (the router, best-single's
    #: RM, margin scales), in (0, 1]: below 1 the offline data is scarce against the stream, as
    #: when a run labels far more pairs than its offline preference set holds
    offline_share: float = 1.0

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError("folds", f"must be >= 2 (cross-fitting), got {self.folds}")
        if self.seeds < 1:
            raise ConfigError("seeds", f"must be >= 1, got {self.seeds}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.reward_noise <= 0.5:
            raise ConfigError("reward_noise", f"must be in [0, 0.5], got {self.reward_noise}")
        if self.reward not in REWARDS:
            raise ConfigError("reward", f"must be one of {REWARDS}, got {self.reward!r}")
        if self.reward == "noisy" and self.reward_noise == 0.0:
            raise ConfigError("reward_noise", "must be > 0 with reward 'noisy'")
        if self.stream_order not in STREAM_ORDERS:
            raise ConfigError(
                "stream_order", f"must be one of {STREAM_ORDERS}, got {self.stream_order!r}"
            )
        if not 1.0 <= self.max_calls_per_pair <= 2.0:
            raise ConfigError(
                "max_calls_per_pair", f"must be in [1, 2], got {self.max_calls_per_pair}"
            )
        if not 0.0 <= self.audit_rate <= 0.5:
            raise ConfigError("audit_rate", f"must be in [0, 0.5], got {self.audit_rate}")
        if self.second_opinion_margin is not None and not 0.0 <= self.second_opinion_margin <= 10:
            raise ConfigError(
                "second_opinion_margin", f"must be in [0, 10], got {self.second_opinion_margin}"
            )
        if not 0.0 < self.offline_share <= 1.0:
            raise ConfigError("offline_share", f"must be in (0, 1], got {self.offline_share}")
        if not self.policies:
            raise ConfigError("policies", "at least one policy is needed")
        for name in (*self.policies, *self.policy_params):
            if name not in POLICY_NAMES:
                raise ConfigError("policies", f"unknown policy {name!r}; known: {POLICY_NAMES}")


def split_names(spec: str) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``: a comma-separated option's names."""
    return tuple(part.strip() for part in spec.split(",") if part.strip())


def parse_policies(spec: str) -> tuple[str, ...]:
    """``"all"`` or a comma-separated list of policy names, validated.

    >>> parse_policies("bayesian, random")
    ('bayesian', 'random')
    """
    if spec.strip() == "all":
        return POLICY_NAMES
    names = split_names(spec)
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


def offline_rows(
    train: np.ndarray, groups: Sequence[str], share: float, rng: np.random.Generator
) -> np.ndarray:
    """The training rows of a random ``share`` of their groups (at least two groups).

    >>> rows = offline_rows(np.arange(8), list("aabbccdd"), 0.5, np.random.default_rng(0))
    >>> len(rows), len({"aabbccdd"[r] for r in rows})
    (4, 2)
    """
    names = sorted({groups[r] for r in train})
    keep = max(2, math.ceil(share * len(names)))
    chosen = {names[i] for i in rng.permutation(len(names))[:keep]}
    return np.array([r for r in train if groups[r] in chosen], dtype=np.int64)


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


def _se(values: np.ndarray) -> float:
    """Standard error of the mean over seeds (0 with one seed)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


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
    config: ReplayConfig | None = None
    #: best RM per domain, chosen on the same pairs (an upper bound for a domain router)
    best_per_domain: float = float("nan")
    best_single: float = float("nan")
    oracle: float = float("nan")

    def accuracy(self, policy: str) -> np.ndarray:
        """Accuracy per seed (a tie counts as half)."""
        return np.array([q.mean() for q in self.traces[policy].quality])

    def quarters(self, policy: str) -> np.ndarray:
        """Accuracy per quarter of the held-out streams, per seed: (seeds, 4).

        Each (seed, fold) stream is cut in four equal parts in stream order; a seed's quarter
        is the mean over its folds' pairs in that quarter.
        """
        streams = self.traces[policy].streams
        out = np.zeros((self.seeds, 4))
        per_seed = len(streams) // max(self.seeds, 1)
        for s in range(self.seeds):
            parts: list[list[np.ndarray]] = [[], [], [], []]
            for q in streams[s * per_seed : (s + 1) * per_seed]:
                for k, chunk in enumerate(np.array_split(q, 4)):
                    parts[k].append(chunk)
            out[s] = [np.concatenate(p).mean() if p else np.nan for p in parts]
        return out

    def gain_over_no_online(self, policy: str) -> dict[str, float] | None:
        """``policy`` minus its own no-online variant, paired by seed, with standard errors."""
        base = NO_ONLINE_VARIANT.get(policy)
        if base is None or base not in self.traces or policy not in self.traces:
            return None
        diff = self.accuracy(policy) - self.accuracy(base)
        last = self.quarters(policy)[:, 3] - self.quarters(base)[:, 3]
        return {
            "versus": base,  # type: ignore[dict-item]
            "accuracy": float(diff.mean()),
            "accuracy_se": _se(diff),
            "last_quarter": float(last.mean()),
            "last_quarter_se": _se(last),
        }

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
        policies: dict[str, Any] = {}
        for name in self.traces:
            acc = self.accuracy(name)
            quarters = self.quarters(name)
            row: dict[str, Any] = {
                "accuracy": float(acc.mean()),
                "accuracy_std": float(acc.std()),
                "accuracy_se": _se(acc),
                "rm_calls_per_pair": self.calls_per_pair(name),
                "by_domain": self.by_domain(name),
                "quarters": [float(v) for v in quarters.mean(axis=0)],
                "quarters_se": [_se(quarters[:, k]) for k in range(4)],
            }
            gain = self.gain_over_no_online(name)
            if gain is not None:
                row["gain_over_no_online"] = gain
            policies[name] = row
        cfg = self.config
        return {
            "pairs": self.n_pairs,
            "rms": list(self.rms),
            "folds": self.folds,
            "seeds": self.seeds,
            "reward": cfg.reward if cfg else "correct",
            "stream_order": cfg.stream_order if cfg else "shuffled",
            "max_calls_per_pair": cfg.max_calls_per_pair if cfg else 1.0,
            "offline_share": cfg.offline_share if cfg else 1.0,
            "matrix": {
                "best_single": self.best_single,
                "best_per_domain": self.best_per_domain,
                "oracle": self.oracle,
            },
            "policies": policies,
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


def matrix_headroom(matrix: BehaviorMatrix) -> tuple[float, float, float]:
    """``(best single RM, best RM per domain, oracle)`` accuracy of a matrix, on all its rows
    (the best RM of a domain is chosen on the same rows: an upper bound for a domain router).
    """
    c = matrix.correct
    if len(c) == 0:
        return float("nan"), float("nan"), float("nan")
    domains = np.array([p.domain for p in matrix.pairs])
    best_single = float(c.mean(axis=0).max())
    per_domain = sum(
        c[domains == d].mean(axis=0).max() * (domains == d).sum() for d in set(domains)
    )
    return best_single, float(per_domain / len(c)), float(c.max(axis=1).mean())


@dataclass(frozen=True)
class FittedRouter:
    """What the replay needs of an offline router fitted on one fold's training rows.

    ``prior_means`` are on the correctness scale (calibrated); ``raw_means`` the BT head as
    trained (what ``bayesian-paper`` injects); ``prior_precision`` / ``sigma2`` the fitted
    strength (``None``: the policy defaults); ``stream_accuracy`` centres the −DPO link.
    """

    contexts: Callable[[np.ndarray], np.ndarray]
    prior_means: np.ndarray
    valid_accuracy: float
    prior_precision: np.ndarray | None = None
    sigma2: float | None = None
    noise: np.ndarray | None = None
    raw_means: np.ndarray | None = None
    stream_accuracy: float = 0.5


#: Fits an offline router on (features, correct, groups, seed, domains) of the training rows.
RouterFitter = Callable[[np.ndarray, np.ndarray, list[str], int, list[str]], FittedRouter]


@dataclass(frozen=True)
class _Stream:
    """One held-out stream: rows in stream order and what every RM said on them."""

    rows: np.ndarray
    correct: np.ndarray  # (P_total, N): matrix.correct, modified on this stream's rows for drift
    margins: np.ndarray
    scales: np.ndarray  # (N,) typical |margin| per RM on the training folds
    best_rm: int
    unsure: np.ndarray  # (N,) scaled |margin| below which a label is worth a second opinion
    train_acc: np.ndarray  # (N,) accuracy per RM on the training folds
    decisive_acc: np.ndarray  # (N,) the same where the RM did not tie (an auditor's accuracy)
    auditor: int  # the RM that audits (gold audits)
    needs_reference: np.ndarray  # (N,) bool: the RM judges only pairs with a reference
    has_reference: np.ndarray  # (P_total,) bool: the pair has a reference answer


def _dpo_proxy(
    label_correct: np.ndarray, position: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Raw −DPO loss of the labels, modelled: the policy agrees with the true preference with
    probability rising along the stream (``DPO_POLICY_AGREEMENT``); a label that agrees with
    the policy's current preference has a positive implicit-reward margin, one that disagrees a
    negative one, with noise. A tie is a coin-flip label."""
    c = np.where(label_correct == 0.5, rng.random(len(label_correct)) < 0.5, label_correct > 0.5)
    q0, q1 = DPO_POLICY_AGREEMENT
    policy_right = rng.random(len(c)) < q0 + (q1 - q0) * position
    agree = c == policy_right
    margin = np.abs(rng.normal(0.8, 0.6, len(c))) * np.where(agree, 1.0, -1.0)
    margin += rng.normal(0.0, 0.5, len(c))
    return -np.logaddexp(0.0, -margin)  # log sigmoid(margin) = −DPO loss


def _stream_policy(
    name: str,
    params: Mapping[str, Any],
    contexts: np.ndarray,
    stream: _Stream,
    fitted: FittedRouter | None,
    config: ReplayConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Stream ``stream.rows`` through one fresh policy. Returns per-pair quality, RM calls made
    and picks per RM."""
    rows, correct, margins = stream.rows, stream.correct, stream.margins
    n_rms = correct.shape[1]
    injects = fitted is not None and name in NEEDS_PRIOR
    policy = make_policy(
        name,
        n_rms=n_rms,
        dim=contexts.shape[1],
        rng=rng,
        prior_means=fitted.prior_means if injects and fitted else None,
        raw_prior_means=fitted.raw_means if injects and fitted and name in RAW_PRIOR else None,
        prior_precision=fitted.prior_precision if injects and fitted else None,
        prior_sigma2=fitted.noise if injects and fitted else None,
        best_rm=stream.best_rm,
        fallback=np.argsort(-stream.train_acc, kind="stable").tolist(),
        margin_scales=stream.scales,
        **dict(params),
    )
    # The −DPO proxy is quantile-normalised per stream, as the gateway does per namespace; only
    # ``bayesian`` maps it through the link onto the correctness scale (the paper's preset and
    # the baselines learn from the quantile itself).
    normalizer = QuantileNormalizer() if config.reward == "dpo-proxy" else None
    link = RewardLink(
        "dpo" if normalizer is not None and name == "bayesian" else "correct",
        informativeness=DPO_INFORMATIVENESS,
        center=fitted.stream_accuracy if fitted is not None else 0.5,
        sigma2=fitted.sigma2 if fitted is not None and fitted.sigma2 else 0.25,
    )
    quality = np.empty(len(rows))
    picks = np.zeros(n_rms, dtype=np.int64)
    calls = 0.0
    for start in range(0, len(rows), config.batch_size):
        sl = slice(start, start + config.batch_size)
        batch_rows = rows[sl]
        ctx = contexts[sl]
        askable = askable_mask(stream.needs_reference, stream.has_reference[batch_rows])
        selection = policy.select(ctx, askable)
        if policy.calls_per_pair != 1.0:
            asked = selection.asked
            calls += float(asked.sum())
            combined = policy.combine(np.where(asked, margins[batch_rows], np.nan))
            quality[sl] = np.where(combined > 0, 1.0, np.where(combined < 0, 0.0, 0.5))
            picks += asked.sum(axis=0)
            continue
        ranking = askable_last(selection.ranking, askable)
        arms = ranking[:, 0].copy()
        calls += len(arms)
        if config.max_calls_per_pair > 1.0 and n_rms > 1:
            calls += _second_opinions(arms, ranking[:, 1], batch_rows, stream, config, calls, start)
        q = correct[batch_rows, arms]
        np.add.at(picks, arms, 1)
        rewards = q.copy()
        if config.reward_noise > 0:
            flip = rng.random(len(q)) < config.reward_noise
            rewards[flip] = 1.0 - rewards[flip]
        if normalizer is not None:
            position = (start + np.arange(len(q))) / max(len(rows) - 1, 1)
            raw = _dpo_proxy(q, position, rng)
            rewards = np.array([normalizer.normalize(raw[i : i + 1])[0] for i in range(len(raw))])
        values, weight = link.map(rewards)
        weights = np.full(len(q), weight)
        if config.audit_rate > 0 and name == "bayesian":
            # As in the gateway: an audit is one more observation of the pair's RM, beside the
            # trainer's reward for it.
            idx, a_values, a_weight = _audit(arms, batch_rows, stream, config, rng)
            calls += len(idx)
            keep = a_weight > 0
            ctx = np.concatenate([ctx, ctx[idx[keep]]])
            arms = np.concatenate([arms, arms[idx[keep]]])
            values = np.concatenate([values, a_values[keep]])
            weights = np.concatenate([weights, a_weight[keep]])
        policy.update(ctx, arms, values, weights)
        quality[sl] = q
    return quality, calls, picks


def _audit(
    arms: np.ndarray,
    batch_rows: np.ndarray,
    stream: _Stream,
    config: ReplayConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gold audits, as the gateway runs them (gateway/audits.py): on a ``config.audit_rate``
    share of pairs not routed to the auditor (and with a reference, for an auditor that needs
    one), the auditor labels the pair too (one call);
    agreement (1, 0, 0.5 for a routed tie; an auditor's tie is skipped, weight 0 here) reaches
    the posterior through :class:`~gateway.routing.prior.AuditLink` with p the auditor's
    training accuracy where it gave a label. Returns the audited pairs' positions, their
    values and weights."""
    p = float(stream.decisive_acc[stream.auditor])
    audited = rng.random(len(arms)) < config.audit_rate
    # Not the auditor's own pairs, nor, for an auditor that needs a reference, pairs without one.
    can = stream.has_reference[batch_rows] | ~stream.needs_reference[stream.auditor]
    idx = np.flatnonzero(audited & (arms != stream.auditor) & can)
    none = (np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
    if p <= 0.5 or not len(idx):
        return none
    mine = stream.correct[batch_rows[idx], arms[idx]]
    gold = stream.correct[batch_rows[idx], stream.auditor]
    agree = np.where(mine == 0.5, 0.5, (mine == gold).astype(np.float64))
    values, weight = AuditLink(p).map(agree)
    return idx, values, np.where(gold == 0.5, 0.0, weight)


def _second_opinions(
    arms: np.ndarray,
    second: np.ndarray,
    batch_rows: np.ndarray,
    stream: _Stream,
    config: ReplayConfig,
    calls: float,
    start: int,
) -> int:
    """Ask the next RM of the draw where the chosen one tied or was unsure, within the budget;
    ``arms`` is updated in place to the RM whose label is used. Returns the extra calls."""
    extra = 0
    budget = config.max_calls_per_pair * (start + len(arms))
    for i, row in enumerate(batch_rows):
        if calls + extra + 1 > budget:
            break
        first = arms[i]
        unsure = stream.correct[row, first] == 0.5 or (
            abs(stream.margins[row, first]) / stream.scales[first] < stream.unsure[first]
        )
        if not unsure:
            continue
        extra += 1
        other = second[i]
        mine = abs(stream.margins[row, first]) / stream.scales[first]
        theirs = abs(stream.margins[row, other]) / stream.scales[other]
        if stream.correct[row, other] != 0.5 and (
            stream.correct[row, first] == 0.5 or theirs > mine
        ):
            arms[i] = other
    return extra


def _reference_masks(matrix: BehaviorMatrix, config: ReplayConfig) -> tuple[np.ndarray, np.ndarray]:
    """(N,) which RMs need a reference (``config.needs_reference``, checked against the
    matrix), (P,) which pairs have one."""
    unknown = sorted(set(config.needs_reference) - set(matrix.rms))
    if unknown:
        raise ConfigError("needs_reference", f"unknown RMs {unknown}; the matrix has {matrix.rms}")
    needs = np.array([rm in config.needs_reference for rm in matrix.rms], dtype=bool)
    has = np.array([p.reference is not None for p in matrix.pairs], dtype=bool)
    return needs, has


def _make_stream(
    matrix: BehaviorMatrix,
    margins: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    config: ReplayConfig,
    rng: np.random.Generator,
    references: tuple[np.ndarray, np.ndarray],
) -> _Stream:
    order = config.stream_order
    correct = matrix.correct
    train_acc = correct[train].mean(axis=0)
    best = int(np.argmax(train_acc))
    rows = rng.permutation(test)
    if order == "by-source":
        keys = np.array([f"{matrix.pairs[r].source}|{matrix.pairs[r].domain}" for r in rows])
        blocks = rng.permutation(sorted(set(keys)))
        rank = {k: i for i, k in enumerate(blocks)}
        rows = rows[np.argsort([rank[k] for k in keys], kind="stable")]
    elif order == "drift":
        # Halfway through, the training-best RM starts answering like the training-worst one.
        worst = int(np.argmin(train_acc))
        late = rows[len(rows) // 2 :]
        correct = correct.copy()
        margins = margins.copy()
        correct[late, best] = correct[late, worst]
        margins[late, best] = margins[late, worst]
    scales = margin_scales(margins[train])
    if config.second_opinion_margin is not None:
        unsure = np.full(len(scales), config.second_opinion_margin)
    else:
        share = min(config.max_calls_per_pair - 1.0, 1.0)
        unsure = np.quantile(np.abs(margins[train]) / scales, share, axis=0)
    if config.audit_rm is None:
        auditor = best
    elif config.audit_rm in matrix.rms:
        auditor = matrix.rms.index(config.audit_rm)
    else:
        raise ConfigError("audit_rm", f"must be one of {matrix.rms}, got {config.audit_rm!r}")
    needs, has = references
    said = matrix.correct[train] != 0.5
    decisive = np.where(said, matrix.correct[train], 0.0).sum(axis=0) / np.maximum(said.sum(0), 1)
    return _Stream(
        rows, correct, margins, scales, best, unsure, train_acc, decisive, auditor, needs, has
    )


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
    references = _reference_masks(matrix, config)
    groups = [p.group for p in matrix.pairs]
    traces = {name: PolicyTrace() for name in config.policies}
    need_router = bool(NEEDS_PRIOR & set(config.policies))
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
            if config.offline_share < 1.0:
                train = offline_rows(train, groups, config.offline_share, split_rng)
            stream = _make_stream(
                matrix, margins, train, np.flatnonzero(fold_of == k), config, split_rng, references
            )
            fitted: FittedRouter | None = None
            if need_router:
                router_seed = int(split_rng.integers(2**31))
                fitted = fit_router(
                    features[train],
                    matrix.correct[train],
                    [groups[i] for i in train],
                    router_seed,
                    [matrix.pairs[i].domain for i in train],
                )
                contexts = fitted.contexts(features[stream.rows])
                valid_accs.append(fitted.valid_accuracy)
            else:
                contexts = np.ones((len(stream.rows), 1))
            # Every policy sees the same contexts (the router's h when a router was fitted):
            # laser's batch context is their mean; the no-offline ablation keeps h but drops
            # the prior mean; ensembles and baselines ignore them.
            for name, prng in zip(config.policies, policy_seeds, strict=True):
                q, calls, picks = _stream_policy(
                    name,
                    dict(config.policy_params.get(name, {})),
                    contexts,
                    stream,
                    fitted,
                    config,
                    prng,
                )
                seed_quality[name] = np.concatenate([seed_quality[name], q])
                seed_rows[name] = np.concatenate([seed_rows[name], stream.rows])
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
    best_single, best_domain, oracle = matrix_headroom(matrix)
    return ReplayResult(
        n_pairs=matrix.n_pairs,
        rms=list(matrix.rms),
        folds=config.folds,
        seeds=config.seeds,
        domains=[p.domain for p in matrix.pairs],
        traces=traces,
        router_valid_accuracy=valid_accs,
        config=config,
        best_per_domain=best_domain,
        best_single=best_single,
        oracle=oracle,
    )


def torch_router_fitter(
    router_params: Mapping[str, Any] | None = None,
    valid_fraction: float = 0.2,
    calibrate: bool = True,
) -> RouterFitter:
    """A :data:`RouterFitter` that trains the real offline router (torch) on each fold.

    With ``calibrate`` (the default) the policies get the router's calibrated prior and its
    stated strength (``OfflineRouter.prior_fit``, :mod:`gateway.routing.prior`); without it
    ``E_bt`` is injected raw, as in the paper, with the policies' default strength.
    """
    from gateway.offline.model import RouterConfig
    from gateway.offline.train import train_router

    params = dict(router_params or {})

    def fit(
        features: np.ndarray,
        correct: np.ndarray,
        groups: list[str],
        seed: int,
        domains: list[str] | None = None,
    ) -> FittedRouter:
        config = RouterConfig(**{**params, "seed": seed})
        rms = [f"rm{n}" for n in range(correct.shape[1])]
        router, report = train_router(
            features,
            correct,
            rms,
            config,
            groups=groups,
            valid_fraction=valid_fraction,
            domains=domains,
        )
        prior = router.prior_fit if calibrate else None
        return FittedRouter(
            contexts=router.hidden,
            prior_means=router.prior_means if prior is not None else router.bt_means,
            valid_accuracy=report.valid_routing_acc,
            prior_precision=router.prior_precision if prior is not None else None,
            sigma2=prior.sigma2 if prior is not None else None,
            noise=np.asarray(prior.noise) if prior is not None else None,
            raw_means=router.bt_means,
            stream_accuracy=prior.stream_accuracy if prior is not None else 0.5,
        )

    return fit
