"""Request and response bodies of the scoring service (the HTTP contract of docs/services.md).

>>> CompareRequest.model_validate(
...     {"pairs": [{"prompt": "2+2?", "response_a": "4", "response_b": "5"}]}
... ).pairs[0].response_b
'5'
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr

from reward_router.http import valid_unicode

#: Every text field: a JSON string (no coercion) that has a UTF-8 encoding.
Text = Annotated[StrictStr, AfterValidator(valid_unicode)]


class ChatMessage(BaseModel):
    """One turn of a conversation prompt."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


Prompt = Text | list[ChatMessage]


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


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None
    rm: str | None = None


class ErrorBody(BaseModel):
    """The one error body of every non-2xx answer."""

    error: ErrorDetail
