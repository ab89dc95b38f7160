"""Asking the RMs: one ``/v1/compare`` call per RM asked (concurrently), falling back along each
pair's ranking when an RM fails, and a budgeted second opinion when the chosen RM ties.

Every call to an RM, from ``/v1/route`` and from OpenRLHF's ``/get_reward`` alike, goes
through :meth:`Dispatcher.ask`: one latency histogram and one fallback counter per RM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gateway.metrics import GatewayMetrics
from gateway.namespaces import NsState
from gateway.rm_client import Comparison, RMClient, RMPool, RMRejected, RMUnavailable
from gateway.routing.policies import Policy, Selection, askable_last, askable_mask
from reward_router.errors import RewardRouterError
from reward_router.protocol import RouteResult

log = logging.getLogger("reward_router.gateway")


class AllRMsFailed(RewardRouterError):
    """Every RM of a pair's ranking failed (HTTP 503)."""


def has_reference(pair: Any) -> bool:
    """Whether ``pair`` carries a reference answer a ``needs_reference`` RM can check against
    (blank text is none)."""
    return bool(pair.reference and pair.reference.strip())


class Dispatcher:
    """The RM pool as the router uses it: orders, asks, falls back."""

    def __init__(self, pool: RMPool, metrics: GatewayMetrics, needs_reference: np.ndarray) -> None:
        self.pool = pool
        self.metrics = metrics
        self.needs_reference = needs_reference
        self.rm_names = pool.names
        self.n_rms = len(pool.clients)

    def select(
        self, policy: Policy, h: np.ndarray, pairs: Sequence[Any]
    ) -> tuple[Selection, np.ndarray]:
        """``policy``'s selection for ``pairs`` among the RMs that can judge each one
        (:func:`~gateway.routing.policies.askable_mask`: a ``needs_reference`` RM cannot judge
        a pair without a reference), and its ranking with the others moved last."""
        has = np.array([has_reference(p) for p in pairs], dtype=bool)
        askable = askable_mask(self.needs_reference, has)
        selection = policy.select(h, askable)
        return selection, askable_last(np.asarray(selection.ranking), askable)

    def order(self, row: np.ndarray, tried: set[int]) -> list[int]:
        """Untried RMs of one ranking: available ones first, then the rest as a last resort."""
        clients = self.pool.clients
        left = [int(a) for a in row if int(a) not in tried]
        return [a for a in left if clients[a].available()] + [
            a for a in left if not clients[a].available()
        ]

    async def ask(
        self, arm: int, idx: list[int], payloads: list[dict[str, Any]]
    ) -> tuple[int, list[int], list[Comparison] | RMUnavailable]:
        client: RMClient = self.pool.clients[arm]
        t0 = time.perf_counter()
        try:
            res = await client.compare([payloads[i] for i in idx])
            self.metrics.rm_latency.labels(client.name, "ok").observe(time.perf_counter() - t0)
            return arm, idx, res
        except RMUnavailable as exc:
            self.metrics.rm_latency.labels(client.name, "error").observe(time.perf_counter() - t0)
            return arm, idx, exc
        except RMRejected:
            self.metrics.rm_latency.labels(client.name, "rejected").observe(
                time.perf_counter() - t0
            )
            raise

    def first_round(
        self, ranking: np.ndarray, asked: np.ndarray, ensemble: bool
    ) -> list[list[int]]:
        """What each pair asks first: the policy's asked set (ensembles), or the first available
        RM of the draw's ranking (single-RM policies; skipping one counts as a fallback)."""
        out = []
        for i in range(ranking.shape[0]):
            if ensemble:
                out.append([int(a) for a in ranking[i] if asked[i, int(a)]])
                continue
            first = self.order(ranking[i], set())[:1]
            top = int(ranking[i, 0])
            if first and first[0] != top:
                self.metrics.fallbacks.labels(self.pool.clients[top].name, "cooldown").inc()
            out.append(first)
        return out

    async def dispatch(
        self, payloads: list[dict[str, Any]], ranking: np.ndarray, first: list[list[int]]
    ) -> tuple[list[dict[int, Comparison]], float]:
        """Ask RMs until every pair has an answer; returns the answers per pair and RM wait."""
        b = len(payloads)
        answers: list[dict[int, Comparison]] = [{} for _ in range(b)]
        tried: list[set[int]] = [set() for _ in range(b)]
        targets: dict[int, list[int]] = {}
        for i in range(b):
            for a in first[i]:
                targets.setdefault(a, []).append(i)
        wait = 0.0
        while targets:
            t0 = time.perf_counter()
            calls = [self.ask(a, idx, payloads) for a, idx in targets.items()]
            done = await asyncio.gather(*calls)
            wait += time.perf_counter() - t0
            targets = {}
            for arm, idx, res in done:
                for i in idx:
                    tried[i].add(arm)
                if isinstance(res, RMUnavailable):
                    name = self.pool.clients[arm].name
                    log.warning("RM %s failed for %d pairs: %s", name, len(idx), res)
                    self.metrics.fallbacks.labels(name, "error").inc(len(idx))
                    continue
                for i, cmp in zip(idx, res, strict=True):
                    answers[i][arm] = cmp
            # Pairs left without any answer go to the next RM of their own ranking. An ensemble
            # pair with some answers keeps them (the failed RMs are left out of the combine).
            for i in sorted({i for _, idx, _ in done for i in idx}):
                if answers[i]:
                    continue
                nxt = self.order(ranking[i], tried[i])[:1]
                if not nxt:
                    raise AllRMsFailed(f"pair {i}: every RM failed ({', '.join(self.rm_names)})")
                targets.setdefault(nxt[0], []).append(i)
        return answers, wait

    async def second_opinions(
        self,
        st: NsState,
        ns: str,
        ranking: np.ndarray,
        answers: list[dict[int, Comparison]],
        payloads: list[dict[str, Any]],
    ) -> float:
        """Ask the next RM of the same draw for pairs whose RM tied, while the namespace's
        ``max_calls_per_pair`` budget (this replica's count, gold audits included) lasts;
        returns the RM wait."""
        cap = float(st.meta.config.get("max_calls_per_pair") or 1.0)
        st.pairs_routed += len(answers)
        if cap <= 1.0 or self.n_rms < 2:
            return 0.0
        targets: dict[int, list[int]] = {}
        for i, ans in enumerate(answers):
            if len(ans) != 1 or next(iter(ans.values())).preferred != "tie":
                continue
            if st.second_opinions + st.audits + 1 > (cap - 1.0) * st.pairs_routed:
                break
            nxt = [a for a in self.order(ranking[i], set(ans)) if self.pool.clients[a].available()]
            if nxt:
                st.second_opinions += 1
                targets.setdefault(nxt[0], []).append(i)
        if not targets:
            return 0.0
        t0 = time.perf_counter()
        done = await asyncio.gather(*(self.ask(a, idx, payloads) for a, idx in targets.items()))
        label = self.metrics.ns_label(ns)
        for arm, idx, res in done:
            self.metrics.second_opinions.labels(label).inc(len(idx))
            if isinstance(res, RMUnavailable):
                continue  # the first RM's tie stands
            for i, cmp in zip(idx, res, strict=True):
                answers[i][arm] = cmp
        return time.perf_counter() - t0

    async def compare_on(self, rm: str, payloads: list[dict[str, Any]]) -> list[Comparison]:
        """Ask the RM named ``rm`` about every payload (OpenRLHF's sticky per-prompt routes),
        metered as any other call; raises :class:`RMUnavailable` (counted as a fallback) when
        it fails, for the caller to route afresh."""
        arm = self.rm_names.index(rm)
        _, _, res = await self.ask(arm, list(range(len(payloads))), payloads)
        if isinstance(res, RMUnavailable):
            self.metrics.fallbacks.labels(rm, "error").inc(len(payloads))
            raise res
        return res


def labels(
    pairs: Sequence[Any],
    answers: list[dict[int, Comparison]],
    ranking: np.ndarray,
    route_ids: list[str],
    rm_names: list[str],
    combine: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[list[int], list[RouteResult]]:
    """Each pair's label from its RMs' answers: the RM that answers for it (a second opinion
    replaces a tie; otherwise the first-ranked answer) and its result. ``combine``: an
    ensemble policy's rule for the answers' margins (majority, uwo); None for single-RM policies.
    """
    combined = None
    if combine is not None:
        margins = np.full((len(pairs), len(rm_names)), np.nan)
        for i, ans in enumerate(answers):
            for arm, cmp in ans.items():
                margins[i, arm] = cmp.score_a - cmp.score_b
        combined = combine(margins)
    arms: list[int] = []
    results: list[RouteResult] = []
    for i, ans in enumerate(answers):
        order = [int(a) for a in ranking[i] if int(a) in ans]
        arm = next((a for a in order if ans[a].preferred != "tie"), order[0])
        arms.append(arm)
        if combined is not None:
            m = float(combined[i])
            preferred = "a" if m > 0 else "b" if m < 0 else "tie"
            score_a = float(np.mean([ans[a].score_a for a in order]))
            score_b = float(np.mean([ans[a].score_b for a in order]))
        else:
            c = ans[arm]
            preferred, score_a, score_b = c.preferred, c.score_a, c.score_b
        results.append(
            RouteResult(
                id=pairs[i].id,
                route_id=route_ids[i],
                rm=rm_names[arm],
                rms=[rm_names[a] for a in order] if combine is not None or len(order) > 1 else None,
                preferred=preferred,  # type: ignore[arg-type]
                score_a=score_a,
                score_b=score_b,
                fallback=combine is None and order[0] != int(ranking[i, 0]),
            )
        )
    return arms, results
