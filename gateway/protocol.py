"""Request and response models of the gateway's HTTP API (what the OpenAPI page shows).

>>> RouteRequest.model_validate({"pairs": [{"prompt": "2+2?", "response_a": "4",
...                                         "response_b": "5"}]}).pairs[0].response_a
'4'
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

NamespaceName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class PairIn(BaseModel):
    """One preference pair; ``id`` is the caller's own tag, echoed back."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, max_length=256)
    prompt: str | Annotated[list[Message], Field(min_length=1)]
    response_a: str
    response_b: str
    reference: str | None = None


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespace: NamespaceName = "default"
    pairs: list[PairIn] = Field(min_length=1)


class RouteResult(BaseModel):
    """The label of one pair and who gave it.

    ``rm`` is the RM that answered (after any fallback); ensemble policies (majority, uwo) ask
    several RMs: then ``rms`` lists them and ``rm`` is the first of them in the draw's ranking.
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

    route_id: str = Field(min_length=1, max_length=256)
    # The trainer's raw signal (−DPO loss); NaN and ±inf are refused (a 422 naming the field).
    reward: Annotated[float, Field(allow_inf_nan=False)]


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

    policy: str | None = None
    params: dict[str, Any] | None = None
    normalizer: Literal["quantile", "zscore", "none"] | None = None
    normalizer_params: dict[str, Any] | None = None
    best_rm: str | None = None


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
