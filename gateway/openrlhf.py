"""OpenRLHF's remote reward model protocol, served by the gateway with sticky per-prompt routes.

OpenRLHF 0.11 (``--reward.remote_url http://GATEWAY/get_reward``; ``openrlhf/utils/agent.py``)
posts ``{"query": [str], "prompts": [str], "labels": [...]}`` and reads
``{"rewards": [float], "scores": [float], "extra_logs": {name: [float]}}``. Its traffic shape:
ONE sample per call, the samples of one prompt as concurrent calls, comma-separated URLs used in
turn per call (so the samples of one prompt reach different gateway replicas), no
``Authorization`` header, a 180 s timeout, 5 tries. ``query`` is the decoded prompt + response
tokens (special tokens kept); ``prompt`` is the prompt as its chat template rendered it.

Scalar rewards from a pairwise router, the same on every replica:

* **Sticky per prompt, in the store.** The first sample of a prompt to claim it (an atomic
  set-if-absent in the store, shared by every replica) becomes the prompt's *anchor*, with the RM
  the namespace's policy drew for it. Concurrent samples race for the claim; the losers read the
  winner's. Every other sample is compared with the anchor by that RM and scores
  ``sigmoid(score_sample - score_anchor)`` in [0, 1] (the Bradley-Terry probability that it
  beats the anchor); the anchor scores 0.5. If the sticky RM fails, the sample is routed afresh
  (``extra_logs["fallback"]``). Every RM call goes through the gateway's dispatcher: the same
  latency and fallback metrics as ``/v1/route``.
* **Templated prompts** are parsed back into messages (:mod:`gateway.chat_templates`) so the
  RM applies its own template once, and a response's trailing end-of-turn token is dropped.
* **Auth without headers**: ``POST /k/{api_key}/get_reward`` takes a trainer key in the path.
* **Closing the loop.** OpenRLHF drops ``route_ids`` and never posts feedback. What the gateway
  can learn from is the ``labels`` OpenRLHF sends with each sample (reference answers, e.g. a
  GSM8K answer): when exactly one of the sample and its anchor has the reference's final answer
  (:mod:`reward_router.answers`), the RM's label is right iff it preferred that one. The gateway
  posts that correctness (1, 0, or 0.5 for a tie) as the comparison's feedback itself, in a
  namespace whose ``reward`` is ``correct`` (the ``openrlhf`` start-up namespace is created so).
  Comparisons of two right or two wrong samples, and samples without a label, teach nothing.

>>> split_response("Q: 2+2? A: 4", "Q: 2+2? A:")
' 4'
>>> round(bt_probability(1.0, 0.0), 3)
0.731
>>> audit(" so 4.\\n#### 4", " #### 5", "4", "a"), audit(" #### 4", " #### 4", "4", "b")
(1.0, None)
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.api import AuthError, Credentials, require_trainer, trainer_keys
from gateway.chat_templates import parse_templated, strip_end_of_turn
from gateway.namespaces import NsState
from gateway.policy_setup import reward_kind
from gateway.rm_client import Comparison, RMUnavailable
from gateway.service import GatewayService
from gateway.settings import NAMESPACE_RE, OPENRLHF_NAMESPACE
from reward_router.answers import answers_match, final_answer
from reward_router.http import key_matches
from reward_router.protocol import (
    FeedbackItem,
    FeedbackRequest,
    PairIn,
    RouteRequest,
    Text,
    valid_unicode,
)

__all__ = [
    "OpenRLHFRequest",
    "OpenRLHFResponse",
    "Sample",
    "StickyRoute",
    "audit",
    "bt_probability",
    "build_openrlhf_router",
    "samples_of",
    "split_response",
]

log = logging.getLogger("reward_router.gateway")

#: ``?namespace=``: which training run's posteriors learn from these samples.
Namespace = Annotated[str, Query(pattern=NAMESPACE_RE.pattern)]


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
    """``rewards`` = ``scores`` (in [0, 1]); ``route_ids`` is ours (OpenRLHF ignores it): the
    route of each compared sample, ``""`` for an anchor."""

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
class Sample:
    """One OpenRLHF sample: its prompt's sticky key, the prompt for the RM, the response."""

    key: str
    prompt: str | list[dict[str, str]]
    response: str
    reference: str | None


def samples_of(body: OpenRLHFRequest) -> list[Sample]:
    """The samples of a request. A prompt in a known chat template becomes messages; without
    ``prompts`` each query is its own prompt (and so its own anchor)."""
    out = []
    for i, query in enumerate(body.query):
        raw = body.prompts[i] if body.prompts is not None else None
        label = body.labels[i] if body.labels is not None else None
        response = strip_end_of_turn(split_response(query, raw))
        prompt: str | list[dict[str, str]] = parse_templated(raw) or raw if raw else response
        reference = None if label is None else str(label)
        out.append(Sample(raw if raw else query, prompt, response, reference or None))
    return out


def audit(response: str, anchor: str, reference: str | None, preferred: str) -> float | None:
    """Whether the RM's label of (response, anchor) was right, by the reference's final answer:
    1.0 right, 0.0 wrong, 0.5 a tie; None when the reference cannot tell (both sides right, both
    wrong, or no final answer in the reference)."""
    ref = final_answer(reference) if reference else None
    if ref is None:
        return None
    ok = [
        (got := final_answer(t)) is not None and answers_match(got, ref) for t in (response, anchor)
    ]
    if ok[0] == ok[1]:
        return None
    if preferred == "tie":
        return 0.5
    return 1.0 if (preferred == "a") == ok[0] else 0.0


def _has_answer(text: str, ref: str) -> bool:
    got = final_answer(text)
    return got is not None and answers_match(got, ref)


@dataclass(frozen=True)
class StickyRoute:
    """A prompt's routing decision, as the store keeps it: its RM and its anchor response."""

    rm: str
    anchor: str

    def encode(self) -> bytes:
        return json.dumps({"rm": self.rm, "anchor": self.anchor}).encode()

    @staticmethod
    def decode(blob: bytes) -> StickyRoute:
        d = json.loads(blob)
        return StickyRoute(str(d["rm"]), str(d["anchor"]))


def _payload(s: Sample, other: str) -> dict[str, Any]:
    ref = {"reference": s.reference} if s.reference else {}
    return {"prompt": s.prompt, "response_a": s.response, "response_b": other, **ref}


class _Scores:
    """What one ``/get_reward`` answers, filled in as the samples are scored."""

    def __init__(self, n: int) -> None:
        self.scores = [0.5] * n
        self.route_ids = [""] * n
        self.rm_index = [0.0] * n
        self.sticky = [0.0] * n
        self.fallback = [0.0] * n
        self.audited = [0.0] * n

    def response(self) -> OpenRLHFResponse:
        return OpenRLHFResponse(
            rewards=self.scores,
            scores=self.scores,
            extra_logs={
                "rm_index": self.rm_index,
                "sticky": self.sticky,
                "fallback": self.fallback,
                "audited": self.audited,
            },
            route_ids=self.route_ids,
        )


async def _sticky_routes(
    svc: GatewayService, st: NsState, samples: list[Sample]
) -> dict[str, StickyRoute]:
    """Each distinct prompt's sticky route: stored already, or drawn now and claimed (the first
    claim in the store wins, on any replica; a lost race takes the winner's)."""
    ns, gen = st.meta.name, st.meta.gen
    keys = list(dict.fromkeys(s.key for s in samples))
    routes = {
        k: StickyRoute.decode(v)
        for k, v in (await svc.store.get_sticky(ns, gen, keys)).items()
        if v is not None
    }
    leads = [next(s for s in samples if s.key == k) for k in keys if k not in routes]
    if leads:
        pairs = [PairIn.model_validate(_payload(s, s.response)) for s in leads]
        arms = await svc.choose(st, pairs)
        for s, arm in zip(leads, arms, strict=True):
            mine = StickyRoute(svc.rm_names[arm], s.response)
            won = await svc.store.claim_sticky(
                ns, gen, s.key, mine.encode(), svc.settings.route_ttl_s
            )
            routes[s.key] = StickyRoute.decode(won)
    return routes


async def score_samples(svc: GatewayService, ns: str, samples: list[Sample]) -> OpenRLHFResponse:
    """Score OpenRLHF samples against their prompts' anchors; audit what the labels can tell."""
    st = await svc.namespaces.state(ns)
    gen = st.meta.gen
    out = _Scores(len(samples))
    routes = await _sticky_routes(svc, st, samples)
    by_rm: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        r = routes[s.key]
        out.rm_index[i] = float(svc.rm_names.index(r.rm))
        if s.response == r.anchor:
            continue  # the anchor itself (or a copy of it): 0.5, nothing to compare
        by_rm.setdefault(r.rm, []).append(i)
    audits: list[FeedbackItem] = []
    for rm, idx in by_rm.items():
        anchors = [routes[samples[i].key].anchor for i in idx]
        payloads = [_payload(samples[i], a) for i, a in zip(idx, anchors, strict=True)]
        try:
            res = await svc.dispatcher.compare_on(rm, payloads)
        except RMUnavailable:
            await _route_afresh(svc, ns, samples, idx, anchors, out)
            continue
        pairs = [PairIn.model_validate(p) for p in payloads]
        ids = await svc.record(ns, gen, [svc.rm_names.index(rm)] * len(idx), pairs)
        for i, a, c, rid in zip(idx, anchors, res, ids, strict=True):
            out.scores[i] = bt_probability(c.score_a, c.score_b)
            out.route_ids[i], out.sticky[i] = rid, 1.0
            audits += _audit_item(samples[i], a, c, rid, out, i)
    if audits:
        await _post_audits(svc, ns, st.meta.config, audits)
    return out.response()


def _audit_item(
    s: Sample, anchor: str, c: Comparison, rid: str, out: _Scores, i: int
) -> list[FeedbackItem]:
    verdict = audit(s.response, anchor, s.reference, c.preferred)
    if verdict is None:
        return []
    out.audited[i] = 1.0
    return [FeedbackItem(route_id=rid, reward=verdict)]


async def _route_afresh(
    svc: GatewayService,
    ns: str,
    samples: list[Sample],
    idx: list[int],
    anchors: list[str],
    out: _Scores,
) -> None:
    """The sticky RM is down: the policy routes these pairs (with its own fallback)."""
    pairs = [
        PairIn.model_validate(_payload(samples[i], a)) for i, a in zip(idx, anchors, strict=True)
    ]
    res, _ = await svc.route(RouteRequest(namespace=ns, pairs=pairs))
    for i, r in zip(idx, res.results, strict=True):
        out.scores[i] = bt_probability(r.score_a, r.score_b)
        out.route_ids[i], out.rm_index[i] = r.route_id, float(svc.rm_names.index(r.rm))
        out.fallback[i] = 1.0


async def _post_audits(
    svc: GatewayService, ns: str, config: dict[str, Any], items: list[FeedbackItem]
) -> None:
    """Audits are correctness: only a namespace that learns from correctness takes them."""
    if reward_kind(config) != "correct":
        log.warning(
            "namespace %s: %d OpenRLHF audits not posted: its reward is %r, audits are "
            "correctness (create it with reward: correct, normalizer: none)",
            ns,
            len(items),
            config.get("reward") or "dpo",
        )
        return
    await svc.feedback(FeedbackRequest(feedback=items))


async def require_path_key(
    request: Request,
    api_key: Annotated[str, Path(max_length=512)],
    creds: Credentials,
) -> None:
    """A trainer key in the path (``/k/{api_key}/...``) or, as anywhere, a bearer header.
    Checked before the body is read, like every key."""
    keys = trainer_keys(request)
    if not keys or key_matches(api_key, keys):
        return
    if creds is not None and key_matches(creds.credentials, keys):
        return
    raise AuthError(
        "missing or invalid API key: send POST /k/<trainer key>/get_reward, or a bearer key"
    )


def build_openrlhf_router(*, default_namespace: str = OPENRLHF_NAMESPACE) -> APIRouter:
    """A FastAPI ``APIRouter`` with ``POST /get_reward`` (trainer key as a bearer header, when
    keys are configured) and ``POST /k/{api_key}/get_reward`` (the key in the path, for
    OpenRLHF, which sends no headers) over the app's ``GatewayService``.

    ``?namespace=`` picks the namespace (default ``default_namespace``).
    """
    router = APIRouter()

    @router.post(
        "/get_reward",
        response_model=OpenRLHFResponse,
        dependencies=[Depends(require_trainer)],
        summary="OpenRLHF remote reward model: scalar rewards with sticky per-prompt routes",
    )
    async def get_reward(
        body: OpenRLHFRequest, request: Request, namespace: Namespace = default_namespace
    ) -> OpenRLHFResponse:
        return await score_samples(request.app.state.service, namespace, samples_of(body))

    @router.post(
        "/k/{api_key}/get_reward",
        response_model=OpenRLHFResponse,
        dependencies=[Depends(require_path_key)],
        summary="/get_reward with the trainer key in the path (OpenRLHF sends no headers)",
    )
    async def get_reward_keyed(
        body: OpenRLHFRequest, request: Request, namespace: Namespace = default_namespace
    ) -> OpenRLHFResponse:
        return await score_samples(request.app.state.service, namespace, samples_of(body))

    return router
