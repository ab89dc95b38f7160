"""Errors of the scoring service, mapped to HTTP in one place (:mod:`services.api`).

    ServiceError                 (every one carries the RM's name)
    ├── InvalidInput        422  a request field is wrong (names the field, e.g. items[3].prompt)
    │   └── InputTooLong    422  an item does not fit max_length and the policy is ``error``
    ├── BatchTooLarge       413  more items than ``max_request_items``
    ├── BodyTooLarge        413  a request body over ``max_body_bytes`` (field ``body``)
    ├── Unauthorized        401  ``api_key`` is set and the request's bearer key is missing / wrong
    ├── NotReady            503  the model is still loading (or failed to load)
    ├── RequestTimeout      504  no answer within ``request_timeout_s``
    ├── UpstreamError       502  the vllm server failed or answered out of schema
    └── ModelError          500  the forward pass raised

Every error reaches the client as one body:
``{"error": {"type": str, "message": str, "field": str | None, "rm": str | None}}``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ServiceError(Exception):
    """Base: an HTTP status, a short type name, a message, the field at fault, the RM."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "service_error"

    def __init__(self, message: str, *, field: str | None = None, rm: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.rm = rm

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "type": self.type,
                "message": self.message,
                "field": self.field,
                "rm": self.rm,
            }
        }


class InvalidInput(ServiceError):
    status = 422
    type = "invalid_input"


class InputTooLong(InvalidInput):
    type = "input_too_long"


class BatchTooLarge(ServiceError):
    status = 413
    type = "batch_too_large"


class BodyTooLarge(ServiceError):
    status = 413
    type = "body_too_large"


class Unauthorized(ServiceError):
    status = 401
    type = "unauthorized"


class NotReady(ServiceError):
    status = 503
    type = "not_ready"


class Overloaded(ServiceError):
    """503 + Retry-After: ``max_in_flight`` requests or ``max_queued_items`` queued already."""

    status = 503
    type = "overloaded"


class RequestTimeout(ServiceError):
    status = 504
    type = "timeout"


class UpstreamError(ServiceError):
    status = 502
    type = "upstream_error"


class ModelError(ServiceError):
    status = 500
    type = "model_error"
