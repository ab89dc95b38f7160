"""HTTP pieces that the gateway and the RM scoring services share (only their HTTP layers
import this module; it needs starlette, the core does not).

* :class:`BodyLimit`: ASGI middleware refusing request bodies over ``max_bytes`` with a 413,
  before they are parsed, streamed (chunked) bodies included.
* :func:`unparsable_body`: why FastAPI could not read a JSON body, for a 422 naming ``body``.
* :func:`valid_unicode`: the validator of every text field of a request (no lone surrogates).

Each app renders the refusal in its own error body, and maps :class:`BodyTooLarge` to the same
answer in its ``HTTPException`` handler::

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, refuse=too_large)
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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


class BodyTooLarge(HTTPException):
    """413: a request body over ``max_bytes``.

    An HTTPException, because FastAPI's body reader turns any other exception raised while it
    reads a streamed body into a 400; it re-raises HTTPExceptions, so the app's handler sees it.

    >>> BodyTooLarge(1024).detail
    'request body over 1024 bytes'
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        super().__init__(413, f"request body over {max_bytes} bytes")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with ``refuse(BodyTooLarge)``.

    Checks Content-Length up front and counts streamed bytes too (chunked uploads have none).
    A body that turns out too large while the app reads it raises :class:`BodyTooLarge` inside
    the app (its handler answers); one the app did not catch is answered here.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, refuse: Callable[[BodyTooLarge], Response]
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self.refuse(BodyTooLarge(self.max_bytes))(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return msg

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge as exc:
            await self.refuse(exc)(scope, receive, send)


def unparsable_body(exc: HTTPException) -> str | None:
    """Why FastAPI could not read a JSON body (its 400 says only "error parsing the body");
    None for any other HTTP error.

    >>> try:
    ...     b"\\xff".decode()
    ... except UnicodeDecodeError as cause:
    ...     exc = HTTPException(400)
    ...     exc.__cause__ = cause
    >>> unparsable_body(exc)
    'body is not valid UTF-8 (byte 0xff at 0)'
    """
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return f"body is not valid UTF-8 (byte {cause.object[cause.start]:#04x} at {cause.start})"
    if isinstance(cause, RecursionError):
        return "body is nested too deeply to parse"
    return f"body could not be parsed as JSON ({type(cause).__name__})"
