"""A namespace's config -> its policy, reward normaliser, reward link and gold audits.

The config is what ``POST /v1/namespaces/{ns}`` stored (policy, params, normaliser, reward,
audits); the router artifact supplies the fitted prior. Every replica builds the same objects
from the same config, so their folds of the same log agree.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from gateway.routing.policies import BayesianPolicy
from gateway.routing.prior import AuditLink, RewardLink
from reward_router.errors import ConfigError

if TYPE_CHECKING:
    from gateway.routing import Policy

#: Largest quantile window a namespace may ask for: each observation sorts the window, so at
#: 300k values one feedback cost 6.7 ms on the event loop and a rebuild was quadratic.
MAX_WINDOW = 16_384


def make_normalizer(kind: str, params: dict[str, Any]) -> Any:
    from gateway.routing import QuantileNormalizer, ZScoreNormalizer

    window = params.get("window")
    if kind == "quantile" and isinstance(window, int) and window > MAX_WINDOW:
        raise ConfigError("normalizer_params", f"window must be at most {MAX_WINDOW}, got {window}")
    if kind == "none":
        if params:
            raise ConfigError("normalizer_params", "must be empty for normalizer 'none'")
        return None
    cls = QuantileNormalizer if kind == "quantile" else ZScoreNormalizer
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError("normalizer_params", f"{exc}") from None


def prior_kwargs(router: Any) -> dict[str, Any]:
    """``make_policy`` keyword arguments from a router artifact: the calibrated prior means,
    their fitted precision and label variance, and the raw BT head (``bayesian-paper``)."""
    if router is None:
        return {}
    fit = getattr(router, "prior_fit", None)
    return {
        "prior_means": router.prior_means,
        "prior_precision": getattr(router, "prior_precision", None),
        "prior_sigma2": None if fit is None else np.asarray(fit.noise),
        "raw_prior_means": getattr(router, "bt_means", None),
    }


def reward_kind(config: dict[str, Any]) -> str:
    """What a namespace's feedback is: ``"dpo"`` (−DPO loss, normalised) or ``"correct"``
    (already P(label right)); by default ``correct`` exactly when there is no normaliser.

    >>> reward_kind({"normalizer": "quantile"}), reward_kind({"normalizer": "none"})
    ('dpo', 'correct')
    """
    return str(config.get("reward") or ("correct" if config.get("normalizer") == "none" else "dpo"))


def reward_link(config: dict[str, Any], router: Any) -> RewardLink:
    """How a namespace's normalised rewards reach its posterior (``gateway.routing.prior``).

    Only ``bayesian`` maps −DPO loss through the link (centred on the accuracy its prior
    expects); ``bayesian-paper`` and the baselines learn from the normalised reward itself.
    """
    kind = reward_kind(config)
    if kind == "dpo" and config.get("normalizer") == "none":
        raise ConfigError("reward", "'dpo' needs a normalizer (quantile or zscore), got 'none'")
    fit = getattr(router, "prior_fit", None)
    if kind == "dpo" and config.get("policy") == "bayesian":
        return RewardLink(
            "dpo",
            informativeness=float(config.get("dpo_informativeness") or 0.1),
            center=fit.stream_accuracy if fit is not None else 0.5,
            sigma2=fit.sigma2 if fit is not None else 0.25,
        )
    return RewardLink("correct")


@dataclass(frozen=True)
class AuditPlan:
    """A namespace's gold audits: a ``rate`` share of routed pairs is also asked of RM ``arm``;
    agreement reaches the routed RM's posterior through ``link``."""

    rate: float
    arm: int
    link: AuditLink


def default_audit_accuracy(
    config: dict[str, Any], rm_names: list[str], router: Any, needs_reference: Sequence[bool]
) -> float:
    """The auditor's accuracy a namespace is created with when ``audit_accuracy`` is not given:
    1 for an RM that needs a reference (a verifier: it labels only pairs it can check), else the
    router artifact's training accuracy of that RM (its prior intercept), else 1 (gold)."""
    n = rm_names.index(config["audit_rm"])
    fit = getattr(router, "prior_fit", None)
    if (n < len(needs_reference) and needs_reference[n]) or fit is None:
        return 1.0
    acc = round(float(fit.intercepts[n]), 4)
    if acc <= 0.5:
        raise ConfigError(
            "audit_accuracy",
            f"the router's training accuracy of {config['audit_rm']!r} is {acc} <= 0.5, so "
            "agreement with it says nothing; give audit_accuracy in (0.5, 1] or another audit_rm",
        )
    return acc


def audit_plan(config: dict[str, Any], rm_names: list[str], policy: Policy) -> AuditPlan | None:
    """A namespace's gold audits from its config (None: off), validated: a bad value is a
    :class:`ConfigError` naming the field."""
    rate = config.get("audit_rate") or 0.0
    if not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise ConfigError("audit_rate", f"must be in [0, 1], got {rate!r}")
    name = config.get("audit_rm")
    if name is not None and name not in rm_names:
        raise ConfigError("audit_rm", f"must be one of {rm_names}, got {name!r}")
    if rate == 0.0:
        return None
    if name is None:
        raise ConfigError("audit_rm", "is needed with audit_rate > 0: the trusted RM that audits")
    cap = float(config.get("max_calls_per_pair") or 1.0)
    if rate > cap - 1.0 + 1e-9:
        raise ConfigError(
            "audit_rate",
            f"audits count against max_calls_per_pair: audit_rate {rate} needs "
            f"max_calls_per_pair >= {1.0 + rate:g}, got {cap:g}",
        )
    if policy.calls_per_pair != 1.0:
        raise ConfigError("audit_rate", f"{policy.name!r} asks several RMs per pair already")
    if policy.learns_online and not isinstance(policy, BayesianPolicy):
        # An audit is worth (2p − 1)² observations; laser counts every reward fully.
        raise ConfigError("audit_rate", f"{policy.name!r} cannot weigh an audit's observation")
    if (
        policy.learns_online
        and config.get("policy") != "bayesian"
        and reward_kind(config) != "correct"
    ):
        raise ConfigError(
            "audit_rate",
            f"{policy.name!r} learns from the normalised reward, not the correctness scale an "
            "audit is on: use policy bayesian, or reward correct",
        )
    acc = config.get("audit_accuracy")
    return AuditPlan(float(rate), rm_names.index(name), AuditLink(1.0 if acc is None else acc))


class NsPolicy(NamedTuple):
    """What a namespace's config builds: the policy, how rewards reach it, its audits."""

    policy: Policy
    normalizer: Any
    #: discounting (``forgetting`` < 1): folded one observation at a time
    forgetting: bool
    link: RewardLink
    audit: AuditPlan | None = None


def build_policy(
    ns: str,
    config: dict[str, Any],
    *,
    rm_names: list[str],
    dim: int,
    router: Any,
    seed: int | None,
) -> NsPolicy:
    """Build (and so validate: a bad value is a :class:`ConfigError` naming the field) the
    policy of namespace ``ns``; its RNG is seeded by the gateway's ``seed`` and the name."""
    from gateway.routing import make_policy

    name = config.get("policy")
    if not isinstance(name, str):
        raise ConfigError("policy", "must be a policy name")
    best = config.get("best_rm")
    best_idx = None
    if best is not None:
        if best not in rm_names:
            raise ConfigError("best_rm", f"must be one of {rm_names}, got {best!r}")
        best_idx = rm_names.index(best)
    rng = np.random.default_rng(None if seed is None else [seed, zlib.crc32(ns.encode())])
    params = dict(config.get("params") or {})
    # best-single's fallback (an RM down, a verifier without a reference): the next RM by the
    # router's per-RM training accuracy, as replay measures it; by index without a router.
    fit = getattr(router, "prior_fit", None)
    fallback = None if fit is None else np.argsort(-np.asarray(fit.intercepts), kind="stable")
    # The router's fitted prior (means, precision, label variance) reaches the policy as
    # arguments; a namespace's own lambda0 / sigma2 in params override them.
    policy = make_policy(
        name,
        n_rms=len(rm_names),
        dim=dim,
        rng=rng,
        best_rm=best_idx,
        fallback=None if fallback is None else fallback.tolist(),
        **prior_kwargs(router),
        **params,
    )
    if policy.requires_labels:
        raise ConfigError(
            "policy",
            f"{name!r} needs each pair's true label, which a live trainer does not have; "
            "use it in `reward-router replay` only",
        )
    normalizer = make_normalizer(
        str(config.get("normalizer", "quantile")), dict(config.get("normalizer_params") or {})
    )
    forgetting = float(params.get("forgetting", 1.0)) < 1.0
    link = reward_link(config, router)
    return NsPolicy(policy, normalizer, forgetting, link, audit_plan(config, rm_names, policy))
