"""OpenRLHF's remote reward model protocol, served by the gateway with sticky per-prompt routes.

OpenRLHF (``--remote_rm_url``) posts ``{"query": [str], "prompts": [str], "labels": [...]}``
(``query`` = prompt + response; ``labels`` e.g. reference answers) and reads
``{"rewards": [float], "scores": [float], "extra_logs": {name: [float]}}``. It often sends one
sample per call, and several samples of one prompt over several calls.

Scalar rewards from a pairwise router: the first sample seen of a prompt is routed by the
gateway's policy (one ``/v1/route`` pair of the sample against itself: context, RM and route
record as for any pair) and becomes the prompt's *anchor*; that routing decision is sticky, so
every later sample of the prompt is compared with the anchor by the SAME RM, and scores
``sigmoid(score_sample - score_anchor)`` (the Bradley-Terry probability that it beats the anchor,
in [0, 1]); the anchor scores 0.5. If the sticky RM fails, the sample is routed afresh (counted
in ``extra_logs["fallback"]``). Stickiness is kept per gateway replica in a bounded LRU map.
Every RM call goes through the gateway's dispatcher (:mod:`gateway.dispatch`): the same
latency and fallback metrics as ``/v1/route``.

Feedback: the answer's ``route_ids`` (one per sample: its prompt's route) go back through
``POST /v1/feedback`` with the trainer's reward for that prompt (e.g. −loss), applied once per
route id.

The gateway mounts it beside its own API (``gateway/app.py``)::

    app.include_router(build_openrlhf_router())

>>> req = OpenRLHFRequest(query=["Q: 2+2? A: 4"], prompts=["Q: 2+2? A:"], labels=["4"])
>>> split_response(req.query[0], req.prompts[0])
' 4'
>>> round(bt_probability(1.0, 0.0), 3)
0.731
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.api import require_trainer
from gateway.rm_client import RMUnavailable
from gateway.service import GatewayService
from gateway.settings import NAMESPACE_RE
from reward_router.protocol import PairIn, RouteRequest, Text, valid_unicode

__all__ = [
    "OpenRLHFRequest",
    "OpenRLHFResponse",
    "StickyRoute",
    "StickyRoutes",
    "bt_probability",
    "build_openrlhf_router",
    "split_response",
]


class OpenRLHFRequest(BaseModel):
    """OpenRLHF's remote RM request; ``prompts`` and ``labels``, if given, match ``query``."""

    model_config = ConfigDict(extra="ignore")

    query: list[Text] = Field(min_length=1)
    prompts: list[Text] | None = None
    labels: list[Any] | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> OpenRLHFRequest:
        for name in ("prompts", "labels"):
            col = getattr(self, name)
            if col is not None and len(col) != len(self.query):
                raise ValueError(f"{name}: {len(col)} items for {len(self.query)} queries")
        return self

    @field_validator("labels")
    @classmethod
    def _labels_are_text(cls, labels: list[Any] | None) -> list[Any] | None:
        # A label becomes a pair's reference text (str(label)): it must be valid Unicode. Only a
        # string label can hold a lone surrogate (str() of a list or dict escapes them).
        for i, label in enumerate(labels or []):
            if isinstance(label, str):
                try:
                    valid_unicode(str(label))
                except ValueError as exc:
                    raise ValueError(f"item {i}: {exc}") from None
        return labels


class OpenRLHFResponse(BaseModel):
    """``rewards`` = ``scores`` (in [0, 1]); ``route_ids`` is ours, OpenRLHF ignores it."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]
    route_ids: list[str]


def split_response(query: str, prompt: str | None) -> str:
    """The response part of an OpenRLHF query (the query minus its prompt prefix)."""
    if prompt and query.startswith(prompt):
        return query[len(prompt) :]
    return query


def bt_probability(score: float, anchor: float) -> float:
    """P(sample beats anchor) under Bradley-Terry, overflow-safe."""
    d = score - anchor
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


@dataclass(frozen=True)
class StickyRoute:
    """A prompt's routing decision: its route record, RM and anchor sample."""

    route_id: str
    rm: str
    anchor: str


class StickyRoutes:
    """Bounded LRU map (namespace, prompt) -> :class:`StickyRoute`.

    >>> s = StickyRoutes(max_entries=2)
    >>> for p in ("p1", "p2"):
    ...     s.put(("ns", p), StickyRoute("r-" + p, "len", "anchor"))
    >>> _ = s.get(("ns", "p1"))
    >>> s.put(("ns", "p3"), StickyRoute("r-p3", "len", "anchor"))
    >>> [k[1] for k in s.keys()]
    ['p1', 'p3']
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._map: OrderedDict[tuple[str, str], StickyRoute] = OrderedDict()

    def get(self, key: tuple[str, str]) -> StickyRoute | None:
        hit = self._map.get(key)
        if hit is not None:
            self._map.move_to_end(key)
        return hit

    def put(self, key: tuple[str, str], route: StickyRoute) -> None:
        self._map[key] = route
        self._map.move_to_end(key)
        while len(self._map) > self.max_entries:
            self._map.popitem(last=False)

    def drop(self, key: tuple[str, str]) -> None:
        self._map.pop(key, None)

    def keys(self) -> list[tuple[str, str]]:
        return list(self._map)


def build_openrlhf_router(
    *, default_namespace: str = "openrlhf", max_sticky: int = 100_000
) -> APIRouter:
    """A FastAPI ``APIRouter`` with ``POST /get_reward`` over the app's ``GatewayService``.

    ``?namespace=`` picks the namespace (default ``default_namespace``). Auth is the gateway's
    trainer rule (API key when configured).
    """
    sticky = StickyRoutes(max_sticky)
    router = APIRouter()

    @router.post(
        "/get_reward",
        response_model=OpenRLHFResponse,
        dependencies=[Depends(require_trainer)],
        summary="OpenRLHF remote reward model: scalar rewards with sticky per-prompt routes",
    )
    async def get_reward(
        body: OpenRLHFRequest,
        request: Request,
        namespace: str = Query(default=default_namespace, pattern=NAMESPACE_RE.pattern),
    ) -> OpenRLHFResponse:
        svc: GatewayService = request.app.state.service
        n = len(body.query)
        prompts = body.prompts or [""] * n
        labels = [None if lb is None else str(lb) for lb in (body.labels or [None] * n)]
        responses = [split_response(q, p) for q, p in zip(body.query, prompts, strict=True)]
        scores = [0.5] * n
        route_ids = [""] * n
        rm_idx = [0.0] * n
        stuck = [0.0] * n
        fallback = [0.0] * n

        def pair(i: int, b: str) -> dict[str, Any]:
            ref = {"reference": labels[i]} if labels[i] else {}
            return {"prompt": prompts[i] or responses[i], "response_a": responses[i],
                    "response_b": b, **ref}  # fmt: skip

        # 1. The first sample of a prompt with no route yet: one routed pair (the sample
        #    against itself) gives the prompt its RM, its route record and its anchor.
        lead: dict[str, int] = {}
        for i in range(n):
            if sticky.get((namespace, prompts[i])) is None:
                lead.setdefault(prompts[i], i)
        if lead:
            idx = sorted(lead.values())
            pairs = [PairIn.model_validate(pair(i, responses[i])) for i in idx]
            out, _ = await svc.route(RouteRequest(namespace=namespace, pairs=pairs))
            for i, r in zip(idx, out.results, strict=True):
                sticky.put((namespace, prompts[i]), StickyRoute(r.route_id, r.rm, responses[i]))
                route_ids[i], rm_idx[i] = r.route_id, float(svc.rm_names.index(r.rm))
                fallback[i] = float(r.fallback)
        # 2. Every other sample: compared with its prompt's anchor by the prompt's RM.
        by_rm: dict[str, list[int]] = {}
        for i in range(n):
            if lead.get(prompts[i]) != i:
                hit = sticky.get((namespace, prompts[i]))
                assert hit is not None
                by_rm.setdefault(hit.rm, []).append(i)
        for rm, idx in by_rm.items():
            routes = [sticky.get((namespace, prompts[i])) for i in idx]
            anchors = [r.anchor if r is not None else "" for r in routes]
            try:
                res = await svc.dispatcher.compare_on(
                    rm, [pair(i, a) for i, a in zip(idx, anchors, strict=True)]
                )
            except RMUnavailable:
                # The sticky RM is down: let the policy route these (with its own fallback)
                # and make the new decision the prompts' sticky route.
                pairs = [
                    PairIn.model_validate(pair(i, a)) for i, a in zip(idx, anchors, strict=True)
                ]
                out, _ = await svc.route(RouteRequest(namespace=namespace, pairs=pairs))
                for i, a, r in zip(idx, anchors, out.results, strict=True):
                    sticky.put((namespace, prompts[i]), StickyRoute(r.route_id, r.rm, a))
                    scores[i] = bt_probability(r.score_a, r.score_b)
                    route_ids[i], rm_idx[i] = r.route_id, float(svc.rm_names.index(r.rm))
                    fallback[i] = 1.0
                continue
            for i, known, c in zip(idx, routes, res, strict=True):
                scores[i] = bt_probability(c.score_a, c.score_b)
                route_ids[i] = known.route_id if known is not None else ""
                rm_idx[i], stuck[i] = float(svc.rm_names.index(rm)), 1.0
        return OpenRLHFResponse(
            rewards=scores,
            scores=scores,
            extra_logs={"rm_index": rm_idx, "sticky": stuck, "fallback": fallback},
            route_ids=route_ids,
        )

    return router
