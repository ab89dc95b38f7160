"""The log -> posterior fold: the one rule every gateway replica, and every audit, applies.

A namespace's state is ``fold(prior, log[1..seq])``. Each raw reward of the log, in sequence
order, is normalised against everything before it (one at a time, whatever batches a replica
happened to read the log in), mapped onto the posterior's scale (P(label right)) by the
namespace's :class:`~gateway.routing.prior.RewardLink`, and added to the answering RM's
posterior. A gold audit's entry (its agreement with a trusted RM, already on the correctness
scale) skips the normaliser and goes through the namespace's
:class:`~gateway.routing.prior.AuditLink` instead. The links depend on the config only and
updates are sums, so two replicas that fold the same prefix of the log hold the same state.

>>> import numpy as np
>>> from gateway.routing import make_policy
>>> from gateway.routing.prior import AuditLink, RewardLink
>>> policy = make_policy("bayesian", n_rms=2, dim=1, rng=np.random.default_rng(0),
...                      prior_means=np.zeros((2, 1)))
>>> fold(policy, None, RewardLink("correct"), np.array([1.0, 0.0]), np.array([0, 1]),
...      np.ones((2, 1)), per_item=False)
>>> policy.posteriors.counts.tolist()
[1, 1]
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from gateway.routing.policies import Policy
from gateway.routing.prior import AuditLink, RewardLink


class Normalizer(Protocol):
    def normalize(self, rewards: np.ndarray) -> np.ndarray: ...


def fold(
    policy: Policy,
    normalizer: Normalizer | None,
    link: RewardLink,
    raw: np.ndarray,
    arms: np.ndarray,
    h: np.ndarray,
    *,
    per_item: bool,
    audit: np.ndarray | None = None,
    audit_link: AuditLink | None = None,
) -> None:
    """Fold observations (raw rewards ``raw``, answering RMs ``arms``, contexts ``h``; in log
    order) into ``normalizer`` and ``policy``, in place.

    ``per_item``: one update call per observation, for policies whose state depends on how a
    batch is split (forgetting discounts per call; laser's update), so the state never depends
    on how the log was read. Otherwise one batched update (sums commute).

    ``audit``: which entries are gold audits (agreements, mapped by ``audit_link``; the
    normaliser never sees them, so it holds the same state with or without audits).
    """
    raw = np.asarray(raw, dtype=np.float64)
    is_audit = np.zeros(len(raw), dtype=bool) if audit is None else np.asarray(audit, dtype=bool)
    fed = np.flatnonzero(~is_audit)
    rewards: Any = raw[fed]
    if normalizer is not None:
        rewards = np.array([normalizer.normalize(raw[i : i + 1])[0] for i in fed])
    values = np.empty(len(raw))
    weights = np.empty(len(raw))
    values[fed], weights[fed] = link.map(rewards)
    # Without audits every weight is the link's one: passed as that scalar, as before audits.
    weight: float | np.ndarray = float(weights[0]) if len(raw) else 1.0
    if is_audit.any():
        idx = np.flatnonzero(is_audit)
        values[idx], weights[idx] = (audit_link or AuditLink()).map(raw[idx])
        weight = weights
    if per_item:
        for i in range(len(raw)):
            policy.update(h[i : i + 1], arms[i : i + 1], values[i : i + 1], float(weights[i]))
    else:
        policy.update(h, arms, values, weight)
