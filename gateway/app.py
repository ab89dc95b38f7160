"""``build_app(settings)``: the FastAPI app; the service is built in the lifespan, not at import.

>>> app = build_app(load_settings("gateway.yaml"))      # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8080)       # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from gateway.api import body_too_large, http_error, install_error_handlers, router
from gateway.openrlhf import build_openrlhf_router
from gateway.service import GatewayService
from gateway.settings import GatewaySettings
from reward_router.http import BodyLimit, RequestGuard

log = logging.getLogger("reward_router.gateway")


def build_app(settings: GatewaySettings, service: GatewayService | None = None) -> FastAPI:
    """The gateway app; ``service`` (already built) is for tests and benchmarks."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for warning in settings.startup_warnings():
            log.warning("gateway: %s", warning)
        svc = service or GatewayService.build(settings)
        await svc.start()
        app.state.service = svc
        try:
            yield
        finally:
            await svc.aclose()

    app = FastAPI(
        title="reward-router gateway",
        version="0.1.0",
        description=(
            "Routes each preference pair to exactly one reward model (contextual Thompson "
            "sampling over per-RM Gaussian posteriors seeded by an offline router) and learns "
            "from the trainer's reward. See docs/gateway.md."
        ),
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(build_openrlhf_router())  # OpenRLHF's POST /get_reward (docs/trainer.md)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, refuse=body_too_large)

    def metrics() -> GatewayService | None:
        return getattr(app.state, "service", None)

    def refused(exc: HTTPException) -> JSONResponse:  # 503 overloaded, 408 body timeout
        if exc.status_code == 503 and (svc := metrics()) is not None:
            svc.metrics.overloaded.inc()
        return http_error(exc)

    def cancelled() -> None:
        if (svc := metrics()) is not None:
            svc.metrics.cancelled.inc()

    # Added last, so it is the outermost layer: an overloaded gateway refuses before reading.
    app.add_middleware(
        RequestGuard,
        max_in_flight=settings.max_in_flight,
        retry_after_s=settings.retry_after_s,
        body_timeout_s=settings.body_timeout_s,
        refuse=refused,
        on_cancel=cancelled,
    )
    return app
