"""The offline router as a prior the online phase can trust: one reward scale, stated strength.

**What the posterior regresses.** For RM n and a pair with context ``h = [h_pair; 1]`` the
posterior's score ``h·w_n`` estimates ``p_n(h)``, the probability that RM n's label of that pair
is right. Every reward that reaches a posterior is put on that scale first: correctness (replay,
a labelled stream) as is, and the trainer's −DPO loss through :class:`RewardLink`.

**The prior mean** (:class:`PriorFit`), per RM, from two kinds of rows the router's weights were
*not* chosen on::

    p_n(h) = a_n + k_n · (r_n(h) − r̄_n)     r_n = s_n − mean_m s_m,  s_n = h·E_bt[n] + b_n

* ``a_n`` is RM n's accuracy on the training rows (many rows, shrunk a little toward the
  pool's mean), ``r̄_n`` the mean of its relative BT score there, so that on average the prior
  predicts each RM's overall accuracy whatever the BT head learned;
* ``k_n ≥ 0`` is a per-RM monotone calibration slope of relative correctness on relative
  score (:func:`calibrate_slopes`: relative, so that a pair's shared difficulty cancels),
  fitted on calibration rows (rows used neither to train the weights nor to choose the
  checkpoint), shrunk toward the pooled slope, then toward 0 by how sure the pooled slope is
  (positive-part James-Stein): a BT head whose scores do not predict held-out correctness gets
  ``k = 0``, and the prior is then exactly "each RM at its overall accuracy" — the best single
  RM, honestly, not by accident. With a domain head the slopes regress what the domain term
  leaves unexplained (correctness minus ``Σ_k q_k (a_n + δ_nk)`` on the calibration rows): a BT
  head learns the domain too, and a slope fitted on raw correctness counts that share twice.
* with a domain head (the router's ``q(h)``: K domain probabilities in the context, see
  :mod:`gateway.offline.model`), ``Σ_k q_k δ_nk`` is added: ``δ_nk`` is RM n's accuracy on
  domain k (training rows weighed by their ``q_k``, shrunk toward ``a_n`` by
  :data:`DOMAIN_SHRINK_ROWS` rows; :func:`domain_accuracy`) minus ``a_n``. As ``Σ_k q_k = 1``,
  ``a_n + Σ_k q_k δ_nk`` is RM n's accuracy mixed over the domains the pair may be from: where
  the skill of RMs differs by domain, the prior knows it before any pair-level signal.

**The prior strength** is stated as pseudo-observations (rows of evidence), per part:

* the intercept of RM n is worth ``intercept_obs[n] = rows`` observations: what the training
  rows really measured. Not capped: on a stationary stream a prior weaker than its rows only
  lets the stream's noise trade near-tied RMs (measured on the pool, ``docs/routing-core.md``).
  A deployment that drifts sets forgetting, which decays every coordinate toward a prior worth
  at most ``forget_obs`` observations (:class:`~gateway.routing.config.BayesianConfig`);
* each domain effect is worth the rows of its domain (``domain_obs``);
* the pair weights are worth ``weight_obs = sigma2 / PAIR_SD²`` observations per direction:
  a prior standard deviation of :data:`PAIR_SD` on any pair's score beyond the prior mean.
  Small on purpose: Thompson sampling explores in proportion to it on every pair, and on the
  real matrices (a few close RMs) a wider one spent more accuracy on exploration than a
  stream of a few hundred pairs could win back. Over long streams the posterior still moves:
  a domain's direction of h gets ~0.8 of each of its observations, so ~``weight_obs``
  observations of a domain move its score halfway from the prior.

Precisions follow as ``obs / sigma2`` with ``sigma2`` the pooled Bernoulli variance of a label.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> s = rng.normal(size=(4000, 2))
>>> c = (rng.random((4000, 2)) < 0.6 + 0.1 * np.clip(s, -2, 2)).astype(float)
>>> fit = fit_prior(s[:2000], c[:2000], s[2000:], c[2000:])
>>> [round(k, 2) for k in fit.slopes], [round(a, 2) for a in fit.intercepts]
([0.09, 0.09], [0.6, 0.6])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from reward_router.errors import ConfigError

#: Prior standard deviation of a pair's score beyond the prior mean (see the module doc).
PAIR_SD = 0.02
#: Bounds of a label noise variance: a {0, 1} label has at most 0.25; a near-certain RM should
#: not make one observation look noiseless.
SIGMA2_RANGE = (0.02, 0.25)
#: Pseudo-rows pulling each RM's accuracy toward the pool's mean (a Beta-prior-like shrink).
_ACCURACY_SHRINK_ROWS = 2.0
#: Pseudo-rows pulling an RM's accuracy on one domain toward its overall accuracy.
DOMAIN_SHRINK_ROWS = 8.0


@dataclass(frozen=True)
class PriorFit:
    """Calibration and strength of the injected prior, as stored with a router artifact.

    Per RM: ``slopes`` (k_n), ``intercepts`` (a_n), ``centers`` (s̄_n), ``intercept_obs``;
    shared: ``sigma2``, ``weight_obs`` and ``stream_accuracy`` (the accuracy the prior expects
    routed labels to have: the centre of the −DPO reward link).
    """

    slopes: tuple[float, ...]
    intercepts: tuple[float, ...]
    centers: tuple[float, ...]
    intercept_obs: tuple[float, ...]
    weight_obs: float
    sigma2: float
    stream_accuracy: float
    #: per-RM label noise variance (``None``: ``sigma2`` for every RM)
    noise: tuple[float, ...] | None = None
    #: slopes act on scores relative to the mean over RMs (False: a version-1 fit, absolute)
    relative: bool = True
    #: per RM and domain of the router's domain head (N, K): the RM's accuracy there minus
    #: its overall accuracy (``None``: no domain head)
    domain_effects: tuple[tuple[float, ...], ...] | None = None
    #: per RM and domain (N, K): how many rows (pseudo-observations) each effect is worth
    domain_obs: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.slopes)
        self._check_domains(n)
        if self.noise is None:
            object.__setattr__(self, "noise", (self.sigma2,) * n)
        for name in ("intercepts", "centers", "intercept_obs", "noise"):
            if len(getattr(self, name)) != n:
                raise ConfigError(name, f"must have one entry per RM ({n})")
        if min(self.noise or (1.0,)) <= 0:
            raise ConfigError("noise", "must all be > 0")
        for name in ("slopes", "intercepts", "centers", "intercept_obs", "noise"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.sigma2 <= 0 or self.weight_obs <= 0 or min(self.intercept_obs, default=1) <= 0:
            raise ConfigError("prior", "sigma2, weight_obs and intercept_obs must be > 0")

    def _check_domains(self, n: int) -> None:
        if (self.domain_effects is None) != (self.domain_obs is None):
            raise ConfigError("domain_obs", "domain_effects and domain_obs go together")
        if self.domain_effects is None or self.domain_obs is None:
            return
        effects = np.asarray(self.domain_effects, dtype=np.float64)
        obs = np.asarray(self.domain_obs, dtype=np.float64)
        if effects.ndim != 2 or effects.shape[0] != n or obs.shape != effects.shape:
            raise ConfigError("domain_effects", f"must be (N={n}, K), with domain_obs alike")
        if not (np.isfinite(effects).all() and (obs > 0).all()):
            raise ConfigError("domain_obs", "effects must be finite and observations > 0")
        for name, arr in (("domain_effects", effects), ("domain_obs", obs)):
            object.__setattr__(self, name, tuple(tuple(float(v) for v in row) for row in arr))

    @property
    def n_rms(self) -> int:
        return len(self.slopes)

    @property
    def n_domains(self) -> int:
        """K, the domain head's domains (0 without one)."""
        return 0 if self.domain_effects is None else len(self.domain_effects[0])

    @property
    def domain_columns(self) -> slice:
        """Where the domain coordinates sit in a context ``[h; q; 1]``: the K before the
        intercept."""
        return slice(-1 - self.n_domains, -1)

    def apply(self, raw_means: np.ndarray) -> np.ndarray:
        """Prior means (N, D) on the correctness scale from raw ``[E_n; b_n]`` rows.

        ``mu0_n = [k_n E_n ; a_n + k_n (b_n − s̄_n)]``, so ``h·mu0_n = a_n + k_n (s_n(h) − s̄_n)``.
        """
        raw = np.asarray(raw_means, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[0] != self.n_rms:
            raise ConfigError("prior_means", f"must have {self.n_rms} rows, got {raw.shape}")
        k = np.asarray(self.slopes)[:, None]
        rel = raw - raw.mean(axis=0) if self.relative else raw  # s_n(h) - mean_m s_m(h)
        out = k * rel
        out[:, -1] = np.asarray(self.intercepts) + k[:, 0] * (rel[:, -1] - np.asarray(self.centers))
        if self.domain_effects is not None:
            out[:, self.domain_columns] = np.asarray(self.domain_effects)
        return out

    def precision(self, dim: int) -> np.ndarray:
        """Diagonal prior precision per RM (N, dim): ``weight_obs / sigma2`` on the pair
        coordinates (a prior sd of the pair-level effect the same for every RM),
        ``intercept_obs[n] / noise[n]`` on the intercept (the last one): the precision of an
        accuracy measured on that many rows of that RM's label noise."""
        out = np.full((self.n_rms, dim), self.weight_obs / self.sigma2)
        noise = np.asarray(self.noise)
        out[:, -1] = np.asarray(self.intercept_obs) / noise
        if self.domain_obs is not None:
            out[:, self.domain_columns] = np.asarray(self.domain_obs) / noise[:, None]
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {
            k: [list(r) if isinstance(r, tuple) else r for r in v] if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
        }
        return {"version": 2, **out}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], n_rms: int) -> PriorFit:
        """From :meth:`to_dict`; a version-1 fit (one scale and offset, lambda0) maps onto the
        same prior means and an isotropic strength."""
        if values.get("version") == 2:
            body = {k: v for k, v in values.items() if k != "version"}
            return cls(**body)
        scale, offset = float(values["scale"]), float(values["offset"])
        sigma2, lambda0 = float(values["sigma2"]), float(values["lambda0"])
        return cls(
            slopes=(scale,) * n_rms,
            intercepts=(offset,) * n_rms,
            centers=(0.0,) * n_rms,
            intercept_obs=(lambda0 * sigma2,) * n_rms,
            weight_obs=lambda0 * sigma2,
            sigma2=sigma2,
            stream_accuracy=offset,
            relative=False,
        )


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares slope of y on x (both centred here), its standard error and sum x²."""
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float(xc @ xc)
    if sxx <= 1e-12 or len(x) < 3:
        return 0.0, math.inf, sxx
    k = float(xc @ yc) / sxx
    resid = yc - k * xc
    se = math.sqrt(float(resid @ resid) / (len(x) - 2) / sxx)
    return k, se, sxx


def relative(scores: np.ndarray) -> np.ndarray:
    """Each row's scores minus their mean over RMs (P, N): what ranks RMs at a pair.

    >>> relative(np.array([[1.0, 3.0]])).tolist()
    [[-1.0, 1.0]]
    """
    s = np.asarray(scores, dtype=np.float64)
    return s - s.mean(axis=1, keepdims=True)


def calibrate_slopes(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Per-RM monotone calibration slopes ``k_n ≥ 0`` of relative correctness on relative BT
    score, (P, N) each: ``c_n − mean_m c_m`` on ``s_n − mean_m s_m``.

    Relative, because a pair's shared difficulty (RMs tend to be wrong on the same hard pairs)
    moves every RM's correctness together: it is noise for an absolute regression, which then
    flattens the slope toward "every RM at its average", but cancels in the differences that
    decide the routing. Each RM's slope is shrunk toward the pooled slope (with as much weight
    as one RM's own rows), clipped at 0, then all are scaled by ``max(0, 1 − 1/t²)`` with t the
    pooled slope's t-statistic: a slope that is not clearly positive is mostly noise.

    >>> rng = np.random.default_rng(1)
    >>> s = rng.normal(size=(300, 2))
    >>> float(calibrate_slopes(s, rng.random((300, 2)) < 0.5).max()) < 0.05
    True
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if s.shape != y.shape or s.ndim != 2 or s.shape[0] < 3:
        raise ConfigError("scores", "need (P, N) scores and correctness with P >= 3")
    if s.shape[1] == 1:  # one RM: nothing to rank, its absolute calibration is what there is
        s, y = np.c_[s, np.zeros_like(s)], np.c_[y, np.zeros_like(y)]
        return calibrate_slopes(s, y)[:1] * 2.0
    s, y = relative(s), relative(y)
    sc = s - s.mean(axis=0)
    yc = y - y.mean(axis=0)
    pooled, se, sxx_all = _slope(sc.ravel(), yc.ravel())
    if pooled <= 0 or not math.isfinite(se):
        return np.zeros(s.shape[1])
    sxx = (sc**2).sum(axis=0)
    sxy = (sc * yc).sum(axis=0)
    tau = sxx_all / s.shape[1]
    slopes = np.maximum((sxy + tau * pooled) / (sxx + tau), 0.0)
    t2 = (pooled / se) ** 2
    return np.asarray(slopes * max(0.0, 1.0 - 1.0 / t2))


def fit_prior(
    train_scores: np.ndarray,
    train_correct: np.ndarray,
    calib_scores: np.ndarray,
    calib_correct: np.ndarray,
    train_domains: np.ndarray | None = None,
    calib_domains: np.ndarray | None = None,
) -> PriorFit:
    """Fit :class:`PriorFit`: accuracies and score centres on the training rows, calibration
    slopes on the calibration rows (never the rows that chose the checkpoint).

    ``train_domains`` (P_train, K), the domain head's probabilities on the training rows, adds
    each RM's accuracy per domain (:func:`domain_accuracy`). ``calib_domains`` (P_calib, K), the
    same on the calibration rows: the slopes then calibrate what the BT score says *beyond* the
    domain effects (they regress the correctness the domain term leaves unexplained). A BT head
    also learns the domain, so a slope fitted on raw correctness counts that share twice."""
    ts, tc = np.asarray(train_scores, float), np.asarray(train_correct, float)
    cs, cc = np.asarray(calib_scores, float), np.asarray(calib_correct, float)
    if ts.ndim != 2 or ts.shape != tc.shape or ts.shape[0] < 1:
        raise ConfigError("train_scores", "need (P, N) training scores and correctness")
    if cs.ndim != 2 or cs.shape != cc.shape or cs.shape[1] != ts.shape[1]:
        raise ConfigError("calib_scores", "need (P, N) calibration scores and correctness")
    rows = ts.shape[0] + cs.shape[0]
    pool = float(np.concatenate([tc, cc]).mean())
    raw_acc = np.concatenate([tc, cc]).mean(axis=0)
    acc = (raw_acc * rows + _ACCURACY_SHRINK_ROWS * pool) / (rows + _ACCURACY_SHRINK_ROWS)
    domain_effects = domain_obs = None
    explained = np.zeros_like(cc)  # what the domain term predicts on the calibration rows
    if train_domains is not None:
        q = _domain_probs("train_domains", train_domains, ts.shape[0])
        per_domain, weight = domain_accuracy(q, tc, acc)
        domain_effects = per_domain - acc[:, None]
        domain_obs = np.broadcast_to(weight, per_domain.shape)
        if calib_domains is not None:
            q_cal = _domain_probs("calib_domains", calib_domains, cs.shape[0], q.shape[1])
            explained = q_cal @ per_domain.T
    elif calib_domains is not None:
        raise ConfigError("calib_domains", "needs train_domains")
    slopes = calibrate_slopes(cs, cc - explained) if cs.shape[0] >= 3 else np.zeros(ts.shape[1])
    rel_train = relative(ts)
    centers = rel_train.mean(axis=0)
    low, high = SIGMA2_RANGE
    both = np.concatenate([tc, cc])
    noise = np.clip(((both - acc) ** 2).mean(axis=0), low, high)  # ties count as 0.5
    sigma2 = float(noise.mean())
    effects = slopes * (rel_train - centers)
    weight_obs = sigma2 / PAIR_SD**2
    predicted = acc + effects
    if train_domains is not None:
        predicted = q @ per_domain.T + effects
    fit = PriorFit(
        slopes=tuple(slopes),
        intercepts=tuple(acc),
        centers=tuple(centers),
        intercept_obs=(float(rows),) * ts.shape[1],
        weight_obs=weight_obs,
        sigma2=sigma2,
        stream_accuracy=float(np.clip(predicted.max(axis=1).mean(), 0.0, 1.0)),
        noise=tuple(float(v) for v in noise),
        domain_effects=None if domain_effects is None else tuple(map(tuple, domain_effects)),
        domain_obs=None if domain_obs is None else tuple(map(tuple, domain_obs)),
    )
    return fit


def _domain_probs(field: str, probs: np.ndarray, rows: int, k: int | None = None) -> np.ndarray:
    q = np.asarray(probs, dtype=np.float64)
    if q.ndim != 2 or q.shape[0] != rows or q.shape[1] < 2 or (k is not None and q.shape[1] != k):
        want = "K >= 2" if k is None else f"K={k}"
        raise ConfigError(field, f"need (P={rows}, {want}), got {q.shape}")
    return q


def domain_accuracy(
    probs: np.ndarray, correct: np.ndarray, overall: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each RM's accuracy per domain (N, K), weighing row i by its domain probability
    ``probs[i, k]``, shrunk toward the RM's ``overall`` accuracy by
    :data:`DOMAIN_SHRINK_ROWS` pseudo-rows; and the rows each domain holds (K,).

    >>> q = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    >>> acc, rows = domain_accuracy(q, np.array([[1.0], [1.0], [0.0], [0.0]]), np.array([0.5]))
    >>> acc.round(3).tolist(), rows.tolist()
    ([[0.6, 0.4]], [2.0, 2.0])
    """
    q = np.asarray(probs, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    rows = q.sum(axis=0)
    per = (c.T @ q + DOMAIN_SHRINK_ROWS * np.asarray(overall)[:, None]) / (
        rows + DOMAIN_SHRINK_ROWS
    )
    return per, rows


@dataclass(frozen=True)
class RewardLink:
    """Maps the trainer's reward onto the posterior's scale (P(label right)) with its weight.

    ``kind="correct"``: the reward already is correctness in [0, 1]; weight 1.

    ``kind="dpo"``: the reward is a quantile-normalised −DPO loss ``u`` in [0, 1], whose mean is
    0.5 whichever RM answered. Modelled as ``E[u | c] = 0.5 + beta (c − c̄)`` with ``c`` the
    label's correctness, ``c̄ = center`` the accuracy the prior expects routed labels to have
    and ``beta = informativeness``; then ``c_hat = c̄ + (u − 0.5) / beta`` is unbiased for
    ``c``, with variance ``var_u / beta²`` (``var_u = 1/12``, a uniform quantile), so each such
    observation counts ``weight = sigma2 beta² / var_u`` correctness observations. The link
    depends only on the prior, never on the current posterior, so folds still commute.

    >>> RewardLink("dpo", informativeness=0.2, center=0.7, sigma2=0.25).map([0.5, 1.0])
    (array([0.7, 3.2]), 0.12)
    """

    kind: str = "correct"
    informativeness: float = 0.1
    center: float = 0.5
    sigma2: float = 0.25

    def __post_init__(self) -> None:
        if self.kind not in ("correct", "dpo"):
            raise ConfigError("reward", f"must be 'correct' or 'dpo', got {self.kind!r}")
        if not 0.0 < self.informativeness <= 1.0:
            raise ConfigError(
                "dpo_informativeness", f"must be in (0, 1], got {self.informativeness!r}"
            )
        if not 0.0 <= self.center <= 1.0:
            raise ConfigError("center", f"must be in [0, 1], got {self.center!r}")

    def map(self, rewards: Any) -> tuple[np.ndarray, float]:
        """``(values on the correctness scale, weight of each observation)``."""
        u = np.asarray(rewards, dtype=np.float64)
        if self.kind == "correct":
            return u, 1.0
        beta = self.informativeness
        weight = round(self.sigma2 * beta**2 * 12.0, 12)
        return self.center + (u - 0.5) / beta, weight


@dataclass(frozen=True)
class AuditLink:
    """Maps a gold audit's agreement onto the posterior's scale (P(label right)) with its weight.

    An audit compares the routed RM's label with a trusted RM's (the auditor's) on the same
    pair: ``agree`` is 1 (same label), 0 (the other label) or 0.5 (the routed RM tied: its label
    is worth half, as ties are scored everywhere). With ``accuracy = p`` the auditor's accuracy
    where it gives a label, and errors independent of the routed RM's,
    ``E[agree | c] = p c + (1 − p)(1 − c)``, so ``(agree − (1 − p)) / (2p − 1)`` is unbiased for
    the routed label's correctness ``c``, with ``1 / (2p − 1)²`` times the variance: each audit
    counts ``(2p − 1)²`` correctness observations. ``p = 1`` (a verifier checking a reference)
    is agreement as is, weight 1. Like :class:`RewardLink` it depends on the namespace's config
    only, never on the posterior, so folds commute.

    >>> AuditLink(0.9).map([1.0, 0.0, 0.5])
    (array([ 1.125, -0.125,  0.5  ]), 0.64)
    """

    accuracy: float = 1.0

    def __post_init__(self) -> None:
        if not 0.5 < self.accuracy <= 1.0:
            raise ConfigError("audit_accuracy", f"must be in (0.5, 1], got {self.accuracy!r}")

    def map(self, agreement: Any) -> tuple[np.ndarray, float]:
        """``(values on the correctness scale, weight of each audit)``."""
        a = np.asarray(agreement, dtype=np.float64)
        gap = 2.0 * self.accuracy - 1.0
        return (a - (1.0 - self.accuracy)) / gap, round(gap**2, 12)
