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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response

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
    app.middleware("http")(_metered(settings.name))

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


def _metered(
    name: str,
) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """Request count and latency per route and status (probes and scrapes left out)."""

    async def metered(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path in UNMETERED:
            return await call_next(request)
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's "client closed request"), not a 500
            raise
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            rm = getattr(request.app.state, "rm", None)
            if rm is not None:
                rm.metrics.requests.labels(name, endpoint, str(status)).inc()
                rm.metrics.latency.labels(name, endpoint).observe(time.perf_counter() - t0)

    return metered
