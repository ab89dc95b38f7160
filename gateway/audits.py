"""Gold audits on ``/v1/route``: a seeded share of a namespace's routed pairs is also asked of a
trusted RM (its ``audit_rm``), and agreement between the routed label and the auditor's becomes
a correctness observation of the routed RM.

Per route call (:class:`Audits`, used by :class:`gateway.service.GatewayService`):

1. :meth:`Audits.select`: pair ``i`` is audited when :func:`share` of its route uid is below
   ``audit_rate`` (so every replica, and a rerun, agrees on which routes are audited), unless
   the auditor is the RM planned for it (nothing to compare), needs a reference the pair lacks
   (a verifier could only abstain) or is down or cooling down (skipped, not waited for);
2. :meth:`Audits.ask`: the auditor is asked, concurrently with the routed RMs. A failure of the
   auditor never fails the route: the route is answered and the audit skipped and counted;
3. :meth:`Audits.settle`, once the labels are known: agreement is 1 (the same label), 0 (the
   other) or 0.5 (the routed RM tied: a tie is worth half, as everywhere); an auditor that ties
   says nothing and is skipped. Each agreement is written as a route record of its own (uid =
   the route's uid + :data:`gateway.store.AUDIT_SUFFIX`) and applied through the store's
   exactly-once feedback step, so it lands in the log once (a retried or repeated apply is a
   duplicate), beside the trainer's own feedback for the route, which still applies. The log
   keeps the raw agreement; folds map it through the namespace's
   :class:`~gateway.routing.prior.AuditLink` (no normaliser, no −DPO link).

Audit calls count against ``max_calls_per_pair`` (a namespace's ``audit_rate`` is at most
``max_calls_per_pair − 1``; second opinions get what audits leave). Metrics:
``reward_router_gateway_audit_calls_total{namespace,outcome}`` (pairs sent to the auditor),
``reward_router_gateway_audits_total{namespace,rm,result}`` (agree / disagree / tie, by the
routed RM) and ``reward_router_gateway_audit_skips_total{namespace,reason}``.

>>> 0.0 <= share(0, "5f0c3b8e2d1a4f6e9b7c8d0e1f2a3b4c") < 1.0
True
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from gateway.dispatch import Dispatcher, has_reference
from gateway.metrics import GatewayMetrics
from gateway.namespaces import NsState
from gateway.rm_client import Comparison, RMRejected
from gateway.store import Outcome, Store, audit_uid
from reward_router.errors import RewardRouterError
from reward_router.protocol import RouteResult

log = logging.getLogger("reward_router.gateway")


def share(seed: int, uid: str) -> float:
    """A route uid's place in [0, 1): uniform over uids, the same on every replica."""
    digest = hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def agreement(routed: str, auditor: str) -> float | None:
    """The routed label's agreement with the auditor's: 1, 0, 0.5 for a routed tie; None when
    the auditor ties (it does not know either).

    >>> agreement("a", "a"), agreement("a", "b"), agreement("tie", "b"), agreement("a", "tie")
    (1.0, 0.0, 0.5, None)
    """
    if auditor == "tie":
        return None
    if routed == "tie":
        return 0.5
    return float(routed == auditor)


class Audits:
    """A gateway's gold audits (see the module docstring)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        store: Store,
        metrics: GatewayMetrics,
        *,
        seed: int | None,
        route_ttl_s: float,
    ) -> None:
        self.dispatcher = dispatcher
        self.store = store
        self.metrics = metrics
        self.seed = seed or 0
        self.route_ttl_s = route_ttl_s

    def _skip(self, ns: str, reason: str, n: int = 1) -> None:
        if n:
            self.metrics.audit_skips.labels(self.metrics.ns_label(ns), reason).inc(n)

    def select(
        self, st: NsState, uids: Sequence[str], planned: Sequence[int], pairs: Sequence[Any]
    ) -> list[int]:
        """The pairs of one route call to audit (counted in the namespace's calls budget)."""
        plan = st.audit
        if plan is None:
            return []
        ns = st.meta.name
        client = self.dispatcher.pool.clients[plan.arm]
        picked = []
        for i, uid in enumerate(uids):
            if share(self.seed, uid) >= plan.rate:
                continue
            if planned[i] == plan.arm:
                self._skip(ns, "self")
            elif self.dispatcher.needs_reference[plan.arm] and not has_reference(pairs[i]):
                self._skip(ns, "no_reference")
            elif not client.available():
                self._skip(ns, "unavailable")
            else:
                picked.append(i)
        st.audits += len(picked)
        return picked

    async def ask(
        self, st: NsState, idx: list[int], payloads: list[dict[str, Any]]
    ) -> list[Comparison] | None:
        """The auditor's answers for pairs ``idx``, or None when it failed (never raises for
        the auditor's sake: the route goes on without its audit)."""
        assert st.audit is not None
        label = self.metrics.ns_label(st.meta.name)
        res: list[Comparison] | None = None
        try:
            _, _, got = await self.dispatcher.ask(st.audit.arm, idx, payloads)
            res = got if isinstance(got, list) else None
        except RMRejected as exc:
            log.warning("audit RM refused %d pairs: %s", len(idx), exc)
        except Exception:  # the auditor's failure, whatever it is, is not the route's
            log.exception("audit RM failed on %d pairs", len(idx))
        self.metrics.audit_calls.labels(label, "error" if res is None else "ok").inc(len(idx))
        if res is None:
            self._skip(st.meta.name, "unavailable", len(idx))
        return res

    async def settle(
        self,
        st: NsState,
        h: np.ndarray,
        idx: list[int],
        answers: list[Comparison] | None,
        arms: list[int],
        results: list[RouteResult],
        uids: Sequence[str],
    ) -> None:
        """Agreement of each audited pair's returned label with the auditor's, applied once to
        the RM that answered (``arms``); ``results`` name the auditor (``audited_by``)."""
        plan = st.audit
        if plan is None or answers is None:
            return
        ns, gen = st.meta.name, st.meta.gen
        names = self.dispatcher.rm_names
        seen: list[tuple[int, float]] = []
        for i, cmp in zip(idx, answers, strict=True):
            results[i].audited_by = names[plan.arm]
            agree = agreement(results[i].preferred, cmp.preferred)
            if arms[i] == plan.arm:  # a fallback or second opinion ended on the auditor
                self._skip(ns, "self")
            elif agree is None:
                self._skip(ns, "auditor_tie")
            else:
                seen.append((i, agree))
        if not seen:
            return
        audit_ids = [audit_uid(uids[i]) for i, _ in seen]
        try:
            # An audit's record is not a route: ``uncount`` takes its route count back.
            ids = await self.store.put_routes(
                ns,
                gen,
                [(arms[i], h[i]) for i, _ in seen],
                self.route_ttl_s,
                uids=audit_ids,
                uncount=[arms[i] for i, _ in seen],
            )
            applied = await self.store.apply_feedback(
                [(rid, a) for rid, (_, a) in zip(ids, seen, strict=True)]
            )
        except RewardRouterError as exc:  # the route stands; this audit is lost, never doubled
            log.warning("audits of %s not recorded: %s", ns, exc)
            self._skip(ns, "store", len(seen))
            return
        label = self.metrics.ns_label(ns)
        for (i, agree), r in zip(seen, applied, strict=True):
            if r.outcome is not Outcome.APPLIED:
                self._skip(ns, "store")
                continue
            result = "tie" if agree == 0.5 else "agree" if agree else "disagree"
            self.metrics.audits.labels(label, names[arms[i]], result).inc()
