"""The scoring service's app: :func:`create_app` builds one FastAPI app for one RM.

Nothing happens at import time. At start-up (lifespan) the serving object
(:class:`services.serving.RMServing`) is built and its backend loaded in the forward-pass thread
while the server already answers ``/healthz`` (``/readyz`` says 503 until the model is in
memory). The routes (:mod:`services.api`) validate requests and call the serving object; every
error leaves through one renderer with the one error body.

>>> app = create_app(load_settings("deploy/rms/length.yaml"))   # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8105)                # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reward_router import http as shared_http
from reward_router.protocol import ErrorBody
from services.api import UNMETERED, install_error_handlers, require_key, router
from services.backends import Backend, make_backend
from services.serving import RMServing
from services.settings import ServiceSettings

log = logging.getLogger("reward_router.services")


def create_app(settings: ServiceSettings, backend: Backend | None = None) -> FastAPI:
    """The FastAPI app of one RM service; ``backend`` defaults to the one the settings name."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for warning in settings.startup_warnings():
            log.warning("rm %s: %s", settings.name, warning)
        rm = RMServing(settings, backend or make_backend(settings))
        app.state.rm = rm
        loading = asyncio.create_task(rm.load(), name="rm-load")
        try:
            yield
        finally:
            loading.cancel()
            await rm.close()

    app = FastAPI(
        title=f"reward-router RM service ({settings.name})",
        lifespan=lifespan,
        responses={422: {"model": ErrorBody}, 503: {"model": ErrorBody}},
        # App-wide, so a route added later is closed by default; OPEN_PATHS are let through.
        dependencies=[Depends(require_key)],
    )
    app.state.settings = settings
    app.include_router(router)
    render = install_error_handlers(app, settings)
    # Added before the metering middleware, so it runs inside it: refused bodies are counted.
    app.add_middleware(
        shared_http.BodyLimit, max_bytes=settings.max_body_bytes, refuse=render.too_large
    )
    app.add_middleware(_Metered, name=settings.name)

    def cancelled() -> None:
        rm = getattr(app.state, "rm", None)
        if rm is not None:
            rm.metrics.cancelled.labels(settings.name).inc()

    # Added last, so it is the outermost layer: an overloaded service refuses before reading.
    app.add_middleware(
        shared_http.RequestGuard,
        max_in_flight=settings.max_in_flight,
        retry_after_s=settings.retry_after_s,
        body_timeout_s=settings.body_timeout_s,
        refuse=render.refused,
        exempt=UNMETERED,
        on_cancel=cancelled,
    )
    return app


class _Metered:
    """ASGI middleware: request count and latency per route and status (probes and scrapes left
    out). Plain ASGI, not Starlette's ``BaseHTTPMiddleware``: that one runs every request in a
    task group of its own and leaves a cancelled scope's ``CancelledError``, traceback and frames
    in a reference cycle per request, garbage only a full collection frees."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNMETERED:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # what the server answers for an exception that leaves the app

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's "client closed request"), not a 500
            raise
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            rm = getattr(scope["app"].state, "rm", None)
            if rm is not None:
                rm.metrics.requests.labels(self.name, endpoint, str(status)).inc()
                rm.metrics.latency.labels(self.name, endpoint).observe(time.perf_counter() - t0)
