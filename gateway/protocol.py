"""Request and response models of the gateway's HTTP API (what the OpenAPI page shows).

>>> RouteRequest.model_validate({"pairs": [{"prompt": "2+2?", "response_a": "4",
...                                         "response_b": "5"}]}).pairs[0].response_a
'4'
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from reward_router.http import valid_unicode

NamespaceName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]

#: Largest |reward| accepted. A −DPO loss is O(1)..O(100); a value near the float limit is a
#: caller bug and would overflow the z-score normaliser (and poison the namespace's log).
MAX_ABS_REWARD = 1e6


#: A string that has a UTF-8 encoding (every text field of a request).
Text = Annotated[str, AfterValidator(valid_unicode)]
#: A caller's tag or a route id: valid Unicode, at most 256 characters.
ShortText = Annotated[str, StringConstraints(max_length=256), AfterValidator(valid_unicode)]


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


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The roles every RM service accepts (services/protocol.py): any other would pass here and
    # be refused by the RM only after routing.
    role: Literal["system", "user", "assistant"]
    content: Text


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
    ``rm`` is then the one whose label is returned.
    """

    id: str | None = None
    route_id: str
    rm: str
    rms: list[str] | None = None
    preferred: Literal["a", "b", "tie"]
    score_a: float
    score_b: float
    fallback: bool = False


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


class NamespaceInfo(BaseModel):
    namespace: str
    created: bool
    config: dict[str, Any]


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """The one error body of every 4xx/5xx answer."""

    error: ErrorDetail
