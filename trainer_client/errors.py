"""What the gateway client raises: one tree, never a bare ``Exception``.

    GatewayError                      (reward_router.errors.RewardRouterError)
    ├── GatewayUnreachable            no answer: connection refused, DNS, reset
    │   └── GatewayTimeout            connect / read / write / pool timeout
    ├── GatewayAPIError               the gateway answered with its error body (``status``,
    │   │                             ``type``, ``message``, ``field``)
    │   ├── AuthError                 401: missing or wrong API key
    │   ├── InvalidRequest            413 / 422: bad input, the field is named
    │   ├── NamespaceNotFound         404
    │   ├── NamespaceConflict         409
    │   ├── GatewayUnavailable        503: every RM failed, or the store is down
    │   └── GatewayServerError        any other 5xx
    └── ResponseFormatError           a 2xx answer that is not what the API documents

``retryable`` says whether waiting and sending again could succeed (transport failures,
503 and other 5xx); the client still retries only calls that are safe to repeat.

>>> err = InvalidRequest(422, "validation_error", "pairs.0.response_a: Field required",
...                      "pairs.0.response_a")
>>> (err.field, err.retryable, isinstance(err, GatewayError))
('pairs.0.response_a', False, True)
"""

from __future__ import annotations

from typing import Any

from reward_router.errors import RewardRouterError


class GatewayError(RewardRouterError):
    """Base of every error the gateway client raises."""

    retryable: bool = False


class GatewayUnreachable(GatewayError):
    """The request got no answer (refused, reset, name not found).

    ``sent`` is False when the request certainly never reached the gateway (connect failed),
    which is what makes even a non-idempotent call safe to send again.
    """

    retryable = True

    def __init__(self, message: str, *, sent: bool = True) -> None:
        self.sent = sent
        super().__init__(message)


class GatewayTimeout(GatewayUnreachable):
    """A connect, read, write or pool timeout (see ``Timeouts``)."""


class ResponseFormatError(GatewayError):
    """A success answer whose body does not parse as the documented response."""


class GatewayAPIError(GatewayError):
    """The gateway answered with an error status and its one error body."""

    def __init__(self, status: int, type: str, message: str, field: str | None = None) -> None:
        self.status = status
        self.type = type
        self.message = message
        self.field = field
        where = f" (field {field})" if field else ""
        super().__init__(f"gateway answered {status} {type}: {message}{where}")

    def __repr__(self) -> str:
        args = f"{self.status}, {self.type!r}, {self.message!r}, {self.field!r}"
        return f"{type(self).__name__}({args})"


class AuthError(GatewayAPIError):
    """401: the API key is missing or wrong."""


class InvalidRequest(GatewayAPIError):
    """413 / 422: the request is malformed; ``field`` names what is wrong."""


class NamespaceNotFound(GatewayAPIError):
    """404: no such namespace (posteriors are only kept once a namespace has routed)."""


class NamespaceConflict(GatewayAPIError):
    """409: the namespace exists with another policy configuration."""


class GatewayUnavailable(GatewayAPIError):
    """503: every RM failed for some pair, or the gateway's store is unreachable."""

    retryable = True


class GatewayServerError(GatewayAPIError):
    """Any other 5xx (a bug or a proxy in between); may be transient."""

    retryable = True


_BY_STATUS: dict[int, type[GatewayAPIError]] = {
    401: AuthError,
    404: NamespaceNotFound,
    409: NamespaceConflict,
    413: InvalidRequest,
    422: InvalidRequest,
    503: GatewayUnavailable,
}


def api_error(status: int, body: Any, text: str = "") -> GatewayAPIError:
    """The typed error for an error answer (the gateway's error body, or anything else).

    >>> api_error(404, {"error": {"type": "unknown_namespace", "message": "no ns 'x'",
    ...                           "field": "namespace"}})
    NamespaceNotFound(404, 'unknown_namespace', "no ns 'x'", 'namespace')
    >>> type(api_error(502, None, "Bad Gateway")).__name__
    'GatewayServerError'
    """
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        type_ = str(detail.get("type", "error"))
        message = str(detail.get("message", ""))
        field = detail.get("field")
    else:
        type_, message, field = "http_error", (text or "no error body")[:500], None
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = GatewayServerError if status >= 500 else GatewayAPIError
    return cls(status, type_, message, None if field is None else str(field))
