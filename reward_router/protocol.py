"""The wire protocol: every body that crosses HTTP between a trainer, the gateway and the RM
services, defined once (the gateway, the RM services and the client all import it).

Pydantic only: no web framework, so ``import trainer_client`` stays light.

* shared: :data:`Text`, :class:`Message`, the one error body (:class:`ErrorBody`);
* the gateway's API: :class:`RouteRequest` / :class:`RouteResponse`, :class:`FeedbackRequest`,
  :class:`NamespaceConfig`, :class:`PosteriorsResponse`, ...;
* an RM service's API: :class:`ScoreRequest`, :class:`CompareRequest`, :class:`InfoResponse`.

>>> RouteRequest.model_validate({"pairs": [{"prompt": "2+2?", "response_a": "4",
...                                         "response_b": "5"}]}).pairs[0].response_a
'4'
>>> CompareRequest.model_validate(
...     {"pairs": [{"prompt": "2+2?", "response_a": "4", "response_b": "5"}]}
... ).pairs[0].response_b
'5'
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, StringConstraints

#: A namespace (one per training run): letters, digits, ``_ . -``; at most 64 characters.
NAMESPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


def valid_unicode(value: str) -> str:
    """Refuse lone surrogates (``"\\ud800"`` in a JSON string): no UTF-8 encoding exists, so
    the text could reach neither an encoder nor a tokenizer (which raises mid-batch, failing
    every request in the batch). Use as a pydantic ``AfterValidator``: a 422 naming the field.

    >>> valid_unicode("é 😀")
    'é 😀'
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"lone surrogate at character {exc.start}: not valid Unicode") from None
    return value


# -- shared -------------------------------------------------------------------------------------

#: Every text field: a JSON string (no coercion) that has a UTF-8 encoding.
Text = Annotated[StrictStr, AfterValidator(valid_unicode)]
#: A caller's tag or a route id: valid Unicode, at most 256 characters.
ShortText = Annotated[StrictStr, StringConstraints(max_length=256), AfterValidator(valid_unicode)]
NamespaceName = Annotated[str, StringConstraints(pattern=NAMESPACE_PATTERN)]


class Message(BaseModel):
    """One turn of a conversation prompt (the roles every RM service accepts)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


#: A prompt: plain text (one user turn) or a conversation.
Prompt = Text | list[Message]


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None
    #: the RM at fault (an RM service's answers; the gateway leaves it out)
    rm: str | None = None


class ErrorBody(BaseModel):
    """The one error body of every 4xx/5xx answer, from the gateway and every RM service."""

    error: ErrorDetail


# -- the gateway's API --------------------------------------------------------------------------

#: Largest |reward| accepted. A −DPO loss is O(1)..O(100); a value near the float limit is a
#: caller bug and would overflow the z-score normaliser (and poison the namespace's log).
MAX_ABS_REWARD = 1e6


def _json_safe(value: Any) -> None:
    """Numbers must fit a float and strings be valid Unicode, at any depth (config values).

    Iterative: JSON nested just under the parser's limit must not overflow the stack here.
    """
    todo: list[tuple[str, Any]] = [("", value)]
    while todo:
        where, v = todo.pop()
        if isinstance(v, bool):
            continue
        if isinstance(v, int) and abs(v) > 1e308:
            raise ValueError(f"{where or 'value'}: integer too large for a float")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{where or 'value'}: must be a finite number")
        if isinstance(v, str):
            valid_unicode(v)
        elif isinstance(v, dict):
            for k, item in v.items():
                valid_unicode(str(k))
                todo.append((f"{where}.{k}" if where else str(k), item))
        elif isinstance(v, list):
            todo.extend((f"{where}.{i}" if where else str(i), item) for i, item in enumerate(v))


def _json_safe_dict(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None:
        if "" in value:
            raise ValueError("parameter names must not be empty")
        _json_safe(value)
    return value


ConfigParams = Annotated[dict[str, Any] | None, AfterValidator(_json_safe_dict)]


class PairIn(BaseModel):
    """One preference pair; ``id`` is the caller's own tag, echoed back."""

    model_config = ConfigDict(extra="forbid")

    id: ShortText | None = None
    prompt: Text | Annotated[list[Message], Field(min_length=1)]
    response_a: Text
    response_b: Text
    reference: Text | None = None


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespace: NamespaceName = "default"
    pairs: list[PairIn] = Field(min_length=1)


class RouteResult(BaseModel):
    """The label of one pair and who gave it.

    ``rm`` is the RM that answered (after any fallback); ensemble policies (majority, uwo) ask
    several RMs: then ``rms`` lists them and ``rm`` is the first of them in the draw's ranking.
    A second opinion (``max_calls_per_pair`` > 1, the first RM tied) lists both RMs in ``rms``;
    ``rm`` is then the one whose label is returned. ``audited_by`` names the namespace's audit
    RM when it also labelled the pair (a gold audit: its agreement with ``preferred`` is an
    observation of ``rm``; the label returned is still ``rm``'s).
    """

    id: str | None = None
    route_id: str
    rm: str
    rms: list[str] | None = None
    preferred: Literal["a", "b", "tie"]
    score_a: float
    score_b: float
    fallback: bool = False
    audited_by: str | None = None


class RouteResponse(BaseModel):
    namespace: str
    results: list[RouteResult]


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    route_id: Annotated[
        str, StringConstraints(min_length=1, max_length=256), AfterValidator(valid_unicode)
    ]
    # The trainer's raw signal (−DPO loss); NaN, ±inf and |reward| > MAX_ABS_REWARD are refused
    # (a 422 naming the field) before anything is logged. Strict: a JSON number only; "0.5",
    # " 7 ", "1e3" and true are refused, not coerced (a trainer sending strings has a bug).
    reward: Annotated[
        float,
        Field(strict=True, allow_inf_nan=False, ge=-MAX_ABS_REWARD, le=MAX_ABS_REWARD),
    ]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    feedback: list[FeedbackItem] = Field(min_length=1)


class FeedbackResponse(BaseModel):
    applied: int
    duplicate: int
    unknown: int


class RMPosterior(BaseModel):
    name: str
    observations: int
    routes: int
    mean_norm: float | None
    uncertainty: float | None
    healthy: bool
    in_cooldown: bool


class PosteriorParams(BaseModel):
    """The natural parameters, for exact comparison between replicas (``detail=full``)."""

    means: list[list[float]]
    eta: list[list[float]]
    precision: list[list[list[float]]]


class PosteriorsResponse(BaseModel):
    namespace: str
    policy: str
    seq: int = Field(description="Observations folded into this replica's posterior.")
    snapshot_seq: int = Field(
        default=0, description="The latest snapshot this replica stored or started from."
    )
    rms: list[RMPosterior]
    params: PosteriorParams | None = None


class NamespaceConfig(BaseModel):
    """A namespace's policy (any of ``gateway.routing.POLICY_NAMES`` except ``oracle``)."""

    model_config = ConfigDict(extra="forbid")

    policy: Text | None = None
    params: ConfigParams = None
    normalizer: Literal["quantile", "zscore", "none"] | None = None
    normalizer_params: ConfigParams = None
    best_rm: Text | None = None
    #: what the feedback reward is: "dpo" (−DPO loss, normalised then mapped through the link)
    #: or "correct" (already P(label right), in [0, 1]); default by the normaliser.
    reward: Literal["dpo", "correct"] | None = None
    dpo_informativeness: float | None = Field(default=None, gt=0, le=1)
    max_calls_per_pair: float | None = Field(default=None, ge=1, le=2)
    #: gold audits: this share of routed pairs is also labelled by ``audit_rm`` (at most
    #: max_calls_per_pair - 1); agreement is a correctness observation of the routed RM
    audit_rate: float | None = Field(default=None, ge=0, le=1)
    audit_rm: Text | None = None
    #: the auditor's accuracy where it gives a label (the calibration); default from the router
    audit_accuracy: float | None = Field(default=None, gt=0.5, le=1)


class NamespaceInfo(BaseModel):
    namespace: str
    created: bool
    config: dict[str, Any]


# -- an RM service's API -----------------------------------------------------------------------


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    response: Text
    reference: Text | None = None


class ScoreRequest(BaseModel):
    """``POST /v1/score``: responses to score, each with its prompt."""

    model_config = ConfigDict(extra="forbid")

    items: list[ScoreItem]


class ScoreResponse(BaseModel):
    """Scores in request order. ``truncated`` / ``abstained`` list item positions."""

    model: str
    scores: list[float]
    truncated: list[int] = Field(default_factory=list)
    abstained: list[int] = Field(default_factory=list)


class ComparePair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    response_a: Text
    response_b: Text
    reference: Text | None = None


class CompareRequest(BaseModel):
    """``POST /v1/compare``: pairs of responses to the same prompt."""

    model_config = ConfigDict(extra="forbid")

    pairs: list[ComparePair]


class CompareResult(BaseModel):
    score_a: float
    score_b: float
    preferred: Literal["a", "b", "tie"]


class CompareResponse(BaseModel):
    """One result per pair, in request order. ``truncated`` / ``abstained``: pair positions."""

    model: str
    results: list[CompareResult]
    truncated: list[int] = Field(default_factory=list)
    abstained: list[int] = Field(default_factory=list)


class InfoResponse(BaseModel):
    """``GET /v1/info``: what this service is."""

    name: str
    backend: str
    model: str
    pairwise: bool
    max_batch_size: int
    max_request_items: int
    max_length: int
    truncation: str
    microbatch: bool
    ready: bool
