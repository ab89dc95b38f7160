"""Synthetic reward models of stated per-domain skill, on real preference pairs.

A *simulation spec* says, for each synthetic RM, how often it is right per domain (and by
default on any other domain); a shared per-pair difficulty makes RMs wrong on the same hard
pairs. :func:`simulate_behavior` turns a list of real pairs and a spec into a
:class:`~reward_router.data.BehaviorMatrix`, so the replay can measure every routing policy on
RMs whose skill is known exactly.

The model is a probit with a shared latent. For pair i and RM n::

    u_in = sqrt(rho) * z_i + sqrt(1 - rho) * e_in,     z_i, e_in ~ N(0, 1) independent
    right  iff u_in < Phi^-1(acc - t/2)
    tie    iff Phi^-1(acc - t/2) <= u_in <= Phi^-1(acc + t/2)
    wrong  otherwise

with ``acc`` the RM's accuracy on pair i's domain and ``t`` the tie rate. u_in is N(0, 1), so
P(right) + P(tie)/2 = acc exactly: per (RM, domain) the expected accuracy (a tie counts half)
is the spec's. ``z_i`` is the pair's difficulty, shared by all RMs; two RMs' latents correlate
by ``rho``, so their errors correlate more as ``rho`` grows. The margin is the latent's distance
from the nearest decision threshold (positive when right, negative when wrong, 0 for a tie):
an RM is confident far from its threshold and unsure near it, as real RMs are.

>>> from reward_router.data import Pair
>>> pairs = [Pair(id=f"p{i}", prompt=[], chosen="a", rejected="b", domain="math")
...          for i in range(4)]
>>> spec = parse_spec({"rms": [{"name": "m", "default": 0.5, "accuracy": {"math": 0.9}}]})
>>> simulate_behavior(pairs, spec, np.random.default_rng(0)).correct.shape
(4, 1)

Everything here is pure: numpy and the standard library, no I/O, an injected seeded generator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from reward_router.data import BehaviorMatrix, Pair
from reward_router.errors import ConfigError

_NORMAL = NormalDist()


@dataclass(frozen=True)
class SyntheticRM:
    """One synthetic RM: accuracy per named domain, ``default`` on every other domain."""

    name: str
    default: float
    accuracy: Mapping[str, float] = field(default_factory=dict)

    def accuracy_on(self, domain: str) -> float:
        return float(self.accuracy.get(domain, self.default))


@dataclass(frozen=True)
class SimulationSpec:
    """A pool of synthetic RMs, the correlation ``rho`` of their latents and the tie rate."""

    rms: tuple[SyntheticRM, ...]
    rho: float = 0.3
    tie_rate: float = 0.0
    description: str = ""

    @property
    def names(self) -> list[str]:
        return [rm.name for rm in self.rms]

    def expected_accuracy(self, domains: Sequence[str]) -> np.ndarray:
        """(P, N) spec accuracy of every RM on every pair's domain."""
        return np.array([[rm.accuracy_on(d) for rm in self.rms] for d in domains])

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "rho": self.rho,
            "tie_rate": self.tie_rate,
            "rms": [
                {"name": rm.name, "default": rm.default, "accuracy": dict(rm.accuracy)}
                for rm in self.rms
            ],
        }


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(where, f"must be a number, got {value!r}")
    return float(value)


def _accuracy(value: Any, where: str, tie_rate: float) -> float:
    acc = _number(value, where)
    half = tie_rate / 2.0
    if not half < acc < 1.0 - half:
        bound = f"({half:g}, {1.0 - half:g})"
        why = f" (tie_rate {tie_rate:g} needs acc ± {half:g} inside (0, 1))" if half else ""
        raise ConfigError(where, f"must be in {bound}{why}, got {acc:g}")
    return acc


def _keys(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown field; allowed: {sorted(allowed)}")


def parse_spec(obj: Any) -> SimulationSpec:
    """Validate a spec given as plain data (the YAML / JSON file, or a preset).

    Shape: ``{"rho": 0.3, "tie_rate": 0.0, "description": "...", "rms": [{"name": "chat",
    "default": 0.55, "accuracy": {"chat": 0.85}}, ...]}``; ``rho``, ``tie_rate`` and
    ``description`` are optional. Every error is a :class:`ConfigError` naming the field
    (``rms[1].accuracy.math``).

    >>> parse_spec({"rms": [{"name": "a", "default": 1.5}]})
    Traceback (most recent call last):
    ...
    reward_router.errors.ConfigError: rms[0].default: must be in (0, 1), got 1.5
    """
    if not isinstance(obj, Mapping):
        raise ConfigError("spec", f"must be a mapping with an 'rms' list, got {type(obj).__name__}")
    _keys(obj, {"rho", "tie_rate", "description", "rms"}, "")
    rho = _number(obj.get("rho", 0.3), "rho")
    if not 0.0 <= rho <= 1.0:
        raise ConfigError("rho", f"must be in [0, 1], got {rho:g}")
    tie_rate = _number(obj.get("tie_rate", 0.0), "tie_rate")
    if not 0.0 <= tie_rate < 1.0:
        raise ConfigError("tie_rate", f"must be in [0, 1), got {tie_rate:g}")
    description = obj.get("description", "")
    if not isinstance(description, str):
        raise ConfigError("description", f"must be a string, got {description!r}")
    raw_rms = obj.get("rms")
    if not isinstance(raw_rms, list) or not raw_rms:
        raise ConfigError("rms", "must be a non-empty list of {name, default, accuracy}")
    rms: list[SyntheticRM] = []
    for n, raw in enumerate(raw_rms):
        where = f"rms[{n}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(where, f"must be a mapping, got {raw!r}")
        _keys(raw, {"name", "default", "accuracy"}, where)
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}.name", f"must be a non-empty string, got {name!r}")
        if name in {rm.name for rm in rms}:
            raise ConfigError(f"{where}.name", f"duplicate RM name {name!r}")
        if "default" not in raw:
            raise ConfigError(f"{where}.default", "missing (the accuracy on unnamed domains)")
        default = _accuracy(raw["default"], f"{where}.default", tie_rate)
        by_domain = raw.get("accuracy", {})
        if not isinstance(by_domain, Mapping):
            raise ConfigError(
                f"{where}.accuracy", f"must map domain -> accuracy, got {by_domain!r}"
            )
        accuracy = {
            str(d): _accuracy(v, f"{where}.accuracy.{d}", tie_rate) for d, v in by_domain.items()
        }
        rms.append(SyntheticRM(name=name, default=default, accuracy=accuracy))
    return SimulationSpec(rms=tuple(rms), rho=rho, tie_rate=tie_rate, description=description)


def simulate_behavior(
    pairs: Sequence[Pair], spec: SimulationSpec, rng: np.random.Generator
) -> BehaviorMatrix:
    """What the spec's RMs would say on ``pairs`` (see the module docstring for the model).

    ``correct`` is in {0, 0.5, 1}; ``margins`` is oriented like a score margin
    (score_chosen - score_rejected: > 0 when right). Same generator state, same matrix.
    """
    if not pairs:
        raise ConfigError("pairs", "no pairs to simulate on")
    acc = spec.expected_accuracy([p.domain for p in pairs])
    half = spec.tie_rate / 2.0
    inv = np.vectorize(_NORMAL.inv_cdf, otypes=[np.float64])
    lower, upper = inv(acc - half), inv(acc + half)
    z = rng.standard_normal((len(pairs), 1))
    e = rng.standard_normal(acc.shape)
    u = np.sqrt(spec.rho) * z + np.sqrt(1.0 - spec.rho) * e
    right, wrong = u < lower, u > upper
    correct = np.where(right, 1.0, np.where(wrong, 0.0, 0.5))
    margins = np.where(right, lower - u, np.where(wrong, upper - u, 0.0))
    return BehaviorMatrix(pairs=list(pairs), rms=spec.names, correct=correct, margins=margins)


def stratified_subsample(
    domains: Sequence[str], max_pairs: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted row indices of at most ``max_pairs`` rows, spread as evenly as the domains allow.

    Each domain gets an equal share; a domain with fewer rows gives its unused share to the
    others (so 600 of {chat 6,195, safety 2,308, math 3,275} is 200 each, and 600 of
    {chat 6,195, safety 50} is 550 + 50). Rows within a domain are drawn without replacement.

    >>> stratified_subsample(["a"] * 5 + ["b"] * 2, 4, np.random.default_rng(0)).size
    4
    """
    if max_pairs < 1:
        raise ConfigError("max_pairs", f"must be >= 1, got {max_pairs}")
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        by_domain.setdefault(d, []).append(i)
    if len(domains) <= max_pairs:
        return np.arange(len(domains))
    quota = dict.fromkeys(by_domain, 0)
    left = max_pairs
    open_domains = sorted(by_domain, key=lambda d: len(by_domain[d]))
    while left > 0 and open_domains:
        share, extra = divmod(left, len(open_domains))
        still_open = []
        for k, d in enumerate(open_domains):
            want = share + (1 if k >= len(open_domains) - extra else 0)
            take = min(want, len(by_domain[d]) - quota[d])
            quota[d] += take
            left -= take
            if quota[d] < len(by_domain[d]):
                still_open.append(d)
        open_domains = still_open
    picked = [
        rng.choice(np.asarray(by_domain[d]), size=quota[d], replace=False)
        for d in sorted(by_domain)
    ]
    return np.sort(np.concatenate(picked))


@dataclass(frozen=True)
class Summary:
    """What the simulated matrix holds, before any policy runs.

    ``accuracy[rm][domain]`` is realised (ties count half); ``best_single`` is the RM best
    overall on these rows; ``best_per_domain`` the accuracy of always asking each domain's best
    RM; ``oracle`` the share of pairs some RM gets right (a tie anywhere, and none right,
    counts half). The ``expected_*`` lines are the same two from the spec, on these rows'
    domains: the realised ones differ by sampling noise (~0.035 per cell at 200 pairs).
    """

    domains: dict[str, int]
    accuracy: dict[str, dict[str, float]]
    expected: dict[str, dict[str, float]]
    best_single: tuple[str, float]
    best_per_domain: float
    best_rm_per_domain: dict[str, str]
    oracle: float
    error_correlation: float
    expected_best_single: float
    expected_best_per_domain: float

    def to_json(self) -> dict[str, Any]:
        return {
            "domains": self.domains,
            "accuracy": self.accuracy,
            "expected_accuracy": self.expected,
            "best_single": {"rm": self.best_single[0], "accuracy": self.best_single[1]},
            "best_per_domain": {"accuracy": self.best_per_domain, "rm": self.best_rm_per_domain},
            "oracle": self.oracle,
            "error_correlation": self.error_correlation,
            "expected": {
                "best_single": self.expected_best_single,
                "best_per_domain": self.expected_best_per_domain,
            },
        }


def error_correlation(correct: np.ndarray, domains: Sequence[str]) -> float:
    """Mean Pearson correlation of the RMs' error indicators, within domains.

    Over every pair of RMs and every domain (weighted by its rows); within a domain, so that
    RMs which are merely good on different domains do not count as correlated. NaN if no
    domain has two RMs with varying errors.
    """
    wrong = (correct < 0.5).astype(np.float64)
    labels = np.asarray(domains)
    total, weight = 0.0, 0
    for d in sorted(set(labels.tolist())):
        rows = wrong[labels == d]
        for a in range(rows.shape[1]):
            for b in range(a + 1, rows.shape[1]):
                if rows[:, a].std() > 0 and rows[:, b].std() > 0:
                    total += len(rows) * float(np.corrcoef(rows[:, a], rows[:, b])[0, 1])
                    weight += len(rows)
    return total / weight if weight else float("nan")


def summarize(matrix: BehaviorMatrix, spec: SimulationSpec) -> Summary:
    """Realised per-(RM, domain) accuracy and the reference lines a router is judged against."""
    domains = np.array([p.domain for p in matrix.pairs])
    names = sorted(set(domains.tolist()))
    accuracy: dict[str, dict[str, float]] = {}
    expected: dict[str, dict[str, float]] = {}
    for n, rm in enumerate(spec.rms):
        accuracy[rm.name] = {d: float(matrix.correct[domains == d, n].mean()) for d in names}
        expected[rm.name] = {d: rm.accuracy_on(d) for d in names}
    overall = matrix.correct.mean(axis=0)
    best = int(np.argmax(overall))
    per_domain_best = {d: max(spec.names, key=lambda rm: accuracy[rm][d]) for d in names}
    counts = {d: int((domains == d).sum()) for d in names}
    best_per_domain = sum(accuracy[per_domain_best[d]][d] * counts[d] for d in names)
    right = matrix.correct == 1.0
    tie = matrix.correct == 0.5
    oracle = np.where(right.any(axis=1), 1.0, np.where(tie.any(axis=1), 0.5, 0.0))
    spec_acc = spec.expected_accuracy(domains.tolist())
    return Summary(
        domains=counts,
        accuracy=accuracy,
        expected=expected,
        best_single=(matrix.rms[best], float(overall[best])),
        best_per_domain=float(best_per_domain / matrix.n_pairs),
        best_rm_per_domain=per_domain_best,
        oracle=float(oracle.mean()),
        error_correlation=error_correlation(matrix.correct, domains.tolist()),
        expected_best_single=float(spec_acc.mean(axis=0).max()),
        expected_best_per_domain=float(spec_acc.max(axis=1).mean()),
    )


#: Built-in specs, as plain data of the same shape as a ``--rms`` file (docs/simulate.md).
PRESETS: dict[str, dict[str, Any]] = {
    "complementary": {
        "description": (
            "three specialists, each 0.85 on its own domain (chat, safety, math) and 0.55"
            " elsewhere, plus a generalist at 0.70 everywhere: best-single is ~0.70, asking"
            " each domain's specialist 0.85"
        ),
        "rho": 0.3,
        "rms": [
            {"name": "chat-specialist", "default": 0.55, "accuracy": {"chat": 0.85}},
            {"name": "safety-specialist", "default": 0.55, "accuracy": {"safety": 0.85}},
            {"name": "math-specialist", "default": 0.55, "accuracy": {"math": 0.85}},
            {"name": "generalist", "default": 0.70},
        ],
    },
    "dominant": {
        "description": (
            "the JudgeBench shape: one judge best in every domain (0.76-0.85), four RMs at"
            " 0.56-0.66 that are near chance where the judge is wrong (rho 0.2): routing can"
            " only lose against always asking the judge"
        ),
        "rho": 0.2,
        "rms": [
            {"name": "judge", "default": 0.78, "accuracy": {"chat": 0.76, "math": 0.85}},
            {"name": "rm-a", "default": 0.62, "accuracy": {"chat": 0.66}},
            {"name": "rm-b", "default": 0.60, "accuracy": {"math": 0.65}},
            {"name": "rm-c", "default": 0.60},
            {"name": "rm-d", "default": 0.56, "accuracy": {"safety": 0.62}},
        ],
    },
    "paper": {
        "description": (
            "resembles the paper's controlled setting (not its RMs): four strong RMs at"
            " 0.82-0.90, three of them leading on one domain by 0.04-0.06, one flat at 0.85,"
            " errors strongly shared (rho 0.6), so majority voting lands between best-single"
            " (~0.85) and the best RM per domain (~0.89)"
        ),
        "rho": 0.6,
        "rms": [
            {
                "name": "rm-chat",
                "default": 0.85,
                "accuracy": {"chat": 0.89, "safety": 0.84, "math": 0.83},
            },
            {
                "name": "rm-safety",
                "default": 0.84,
                "accuracy": {"chat": 0.84, "safety": 0.89, "math": 0.82},
            },
            {
                "name": "rm-math",
                "default": 0.84,
                "accuracy": {"chat": 0.82, "safety": 0.83, "math": 0.90},
            },
            {"name": "rm-flat", "default": 0.85},
        ],
    },
}


def preset(name: str) -> SimulationSpec:
    """A built-in spec by name (:data:`PRESETS`).

    >>> preset("complementary").names
    ['chat-specialist', 'safety-specialist', 'math-specialist', 'generalist']
    """
    if name not in PRESETS:
        raise ConfigError("rms", f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return parse_spec(PRESETS[name])


#: The paper's headline figure, quoted beside ours (their protocol, not ours: docs/simulate.md).
PAPER_FIGURES: dict[str, Any] = {
    "source": "Wu & Lu, Reward Model Routing in Alignment (BayesianRouter, ICLR 2026)",
    "protocol": "the paper's controlled protocol: labelling accuracy of its real RM pool",
    "labelling_accuracy_percent": {"BayesianRouter": 88.23, "LASeR": 85.54, "majority": 85.64},
}


def domain_probe(
    features: np.ndarray,
    domains: Sequence[str],
    groups: Sequence[str],
    rng: np.random.Generator,
    folds: int = 5,
    ridge: float = 1.0,
) -> list[str]:
    """Each pair's domain as a linear probe on its features predicts it, held out.

    In a simulation the RMs' skill depends only on the domain, so this says what a router on
    these features can learn: where the probe cannot tell two domains apart, a router cannot
    send each to its specialist either (unless it finds more than a linear probe does).
    One-vs-rest ridge regression on standardised features, ``folds`` folds split by group (a
    prompt's rows never straddle folds); each row is predicted by the fold that left it out.
    """
    labels = sorted(set(domains))
    if len(labels) < 2:
        return list(domains)
    y = np.array([labels.index(d) for d in domains])
    unique = sorted(set(groups))
    fold_of_group = dict(zip(unique, rng.permutation(len(unique)) % folds, strict=True))
    fold = np.array([fold_of_group[g] for g in groups])
    predicted = y.copy()
    for k in range(folds):
        train, test = fold != k, fold == k
        if not train.any() or not test.any():
            continue
        mean, std = features[train].mean(axis=0), features[train].std(axis=0) + 1e-6
        x_train = np.hstack([(features[train] - mean) / std, np.ones((int(train.sum()), 1))])
        x_test = np.hstack([(features[test] - mean) / std, np.ones((int(test.sum()), 1))])
        targets = np.eye(len(labels))[y[train]]
        gram = x_train.T @ x_train + ridge * np.eye(x_train.shape[1])
        weights = np.linalg.solve(gram, x_train.T @ targets)
        predicted[test] = np.argmax(x_test @ weights, axis=1)
    return [labels[i] for i in predicted]


@dataclass(frozen=True)
class ProbeReport:
    """How well the features tell the domains apart, and what routing on that alone earns.

    ``recall[d]``: share of domain d's pairs the probe puts in d. ``routed_accuracy``: send
    each pair to the best RM (in hindsight) of its *predicted* domain: a router that knows
    only what a linear probe knows.
    """

    accuracy: float
    recall: dict[str, float]
    routed_accuracy: float

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "recall": self.recall,
            "routed_accuracy": self.routed_accuracy,
        }


def probe_report(matrix: BehaviorMatrix, predicted: Sequence[str], summary: Summary) -> ProbeReport:
    """Score :func:`domain_probe`'s predictions against the matrix (see :class:`ProbeReport`)."""
    domains = np.array([p.domain for p in matrix.pairs])
    guess = np.asarray(predicted)
    recall = {d: float((guess[domains == d] == d).mean()) for d in sorted(set(domains.tolist()))}
    fallback = summary.best_single[0]
    picks = [matrix.rms.index(summary.best_rm_per_domain.get(g, fallback)) for g in guess.tolist()]
    routed = matrix.correct[np.arange(matrix.n_pairs), picks]
    return ProbeReport(
        accuracy=float((guess == domains).mean()),
        recall=recall,
        routed_accuracy=float(routed.mean()),
    )
