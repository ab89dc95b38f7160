"""HTTP pieces that the gateway and the RM scoring services share (only their HTTP layers
import this module; it needs starlette, the core does not).

* :func:`key_matches`: a bearer key against the configured keys, in constant time.
* :class:`BodyLimit`: ASGI middleware refusing request bodies over ``max_bytes`` with a 413,
  before they are parsed, streamed (chunked) bodies included.
* :func:`unparsable_body`: why FastAPI could not read a JSON body, for a 422 naming ``body``.
* :class:`RequestGuard`: ASGI middleware bounding the work in flight (``max_in_flight``
  requests, then a 503 with ``Retry-After``), timing out slow bodies (408) and cancelling a
  request's work when its client goes away.
* :func:`header_timeout_protocol`: uvicorn's HTTP protocol with a deadline for the request
  line and headers (a slow-headers client is disconnected).

Each app renders the refusal in its own error body, and maps :class:`BodyTooLarge` to the same
answer in its ``HTTPException`` handler::

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, refuse=too_large)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Callable, Iterable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def key_matches(given: str, keys: Iterable[str]) -> bool:
    """Whether ``given`` is one of ``keys`` (a bearer key check). Compared against every key in
    constant time, with no early exit, so timing says nothing about which key matched.

    >>> key_matches("k2", ["k1", "k2"]), key_matches("k3", ["k1", "k2"])
    (True, False)
    """
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given.encode(), k.encode())
    return ok


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


class Overloaded(HTTPException):
    """503: ``max_in_flight`` requests are being served already; retry after ``retry_after_s``.

    >>> Overloaded(128, 1).headers
    {'retry-after': '1', 'connection': 'close'}
    """

    def __init__(self, max_in_flight: int, retry_after_s: int) -> None:
        super().__init__(
            503,
            f"overloaded: {max_in_flight} requests in flight already; retry after "
            f"{retry_after_s} s",
            # Closed after the answer: a refused client may still be sending its body, and
            # a connection waiting for it would be held open with no deadline.
            headers={"retry-after": str(retry_after_s), "connection": "close"},
        )


class BodyTimeout(HTTPException):
    """408: the request body did not arrive within ``timeout_s`` (the connection is closed)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408,
            f"request body not received within {timeout_s:g} s",
            headers={"connection": "close"},
        )


class RequestGuard:
    """ASGI middleware: bounded work in flight, slow bodies timed out, abandoned work cancelled.

    * More than ``max_in_flight`` requests at once (paths in ``exempt``, the health probes and
      ``/metrics``, are not counted): the new one is answered ``refuse(Overloaded)`` at once, a
      503 with ``Retry-After``, before its body is read. A queue that only grows helps nobody:
      past capacity every extra request makes every other one later.
    * The body must arrive within ``body_timeout_s`` of the request's headers: else the
      request's task is cancelled and ``refuse(BodyTimeout)`` answers (408, connection closed).
    * Once the body is read, a watcher waits for the client to disconnect; if it does before the
      response is complete, the request's task is cancelled (RM calls, encoding and queue
      slots with it) and ``on_cancel()`` is called.

    >>> app = RequestGuard(app, max_in_flight=256, retry_after_s=1, body_timeout_s=30,
    ...                    refuse=error_response)                       # doctest: +SKIP
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_in_flight: int,
        retry_after_s: int,
        body_timeout_s: float,
        refuse: Callable[[HTTPException], Response],
        exempt: frozenset[str] = frozenset({"/healthz", "/readyz", "/metrics"}),
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.body_timeout_s = body_timeout_s
        self.refuse = refuse
        self.exempt = exempt
        self.on_cancel = on_cancel
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            exc = Overloaded(self.max_in_flight, self.retry_after_s)
            await self.refuse(exc)(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = _GuardedRequest(self.body_timeout_s, receive, send)
        task = req.start(self.app(scope, req.receive, req.send))
        try:
            await task
        except asyncio.CancelledError:
            if req.timed_out:  # nothing was answered yet: the body never came
                await self.refuse(BodyTimeout(self.body_timeout_s))(scope, receive, send)
                return
            if not req.cancelled_here:
                raise  # the server is shutting down: not ours to swallow
            if self.on_cancel is not None:
                self.on_cancel()
        finally:
            await req.stop_watching()


class _GuardedRequest:
    """One request under :class:`RequestGuard`: its ``receive`` (body deadline, then a watcher
    for the client's disconnect) and ``send`` (notes when the response is complete)."""

    def __init__(self, body_timeout_s: float, receive: Receive, send: Send) -> None:
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + body_timeout_s
        self._receive = receive
        self._send = send
        self.body_read = False
        self.responded = False
        self.gone: asyncio.Future[Message] = self.loop.create_future()
        self.watcher: asyncio.Task[None] | None = None
        self.cancelled_here = False
        self.timed_out = False
        self.task: asyncio.Future[None] = self.loop.create_future()

    def start(self, app_call: Any) -> asyncio.Future[None]:
        """Run the app's call for this request as a task (what a disconnect or timeout cancels)."""
        self.task = asyncio.ensure_future(app_call)
        return self.task

    async def _watch(self) -> None:
        msg = await self._receive()  # after the body: returns when the client goes away
        if not self.gone.done():
            self.gone.set_result(msg)
        if msg["type"] == "http.disconnect" and not self.responded and not self.task.done():
            self.cancelled_here = True
            self.task.cancel()

    async def receive(self) -> Message:
        if self.body_read:  # the app listens for the disconnect: share the watcher's answer
            return await asyncio.shield(self.gone)
        # asyncio.wait, not asyncio.timeout: a timeout cancels the current task, which an
        # anyio cancel scope around it (Starlette's BaseHTTPMiddleware) may swallow.
        # Raising from here would not do either: Starlette's BaseHTTPMiddleware wraps it in
        # an ExceptionGroup, which FastAPI reports as an unparsable body. So the request's
        # task is cancelled and the 408 is answered by the guard.
        pending = asyncio.ensure_future(self._receive())
        await asyncio.wait({pending}, timeout=max(0.0, self.deadline - self.loop.time()))
        if not pending.done():
            pending.cancel()
            self.timed_out = True
            self.task.cancel()
            await self.loop.create_future()  # never set: the cancellation unwinds the app here
        msg = pending.result()
        if msg["type"] != "http.request" or not msg.get("more_body", False):
            self.body_read = True
            if msg["type"] == "http.disconnect":
                self.gone.set_result(msg)
            else:
                self.watcher = asyncio.create_task(self._watch())
        return msg

    async def send(self, msg: Message) -> None:
        if self.timed_out:
            return  # the 408 is answered by the guard, once the app is unwound
        if msg["type"] == "http.response.body" and not msg.get("more_body", False):
            self.responded = True
        await self._send(msg)

    async def stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing a connection whose request line and headers do not
    arrive within ``timeout_s`` of the connection (or of the first byte of a keep-alive
    request). uvicorn has no such deadline: without it, 1,000 clients trickling headers hold
    1,000 sockets forever and exhaust the process's file descriptors.

    >>> uvicorn.run(app, http=header_timeout_protocol(10.0))            # doctest: +SKIP
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

    return HeaderTimeoutProtocol
