"""The RM service's HTTP layer: thin routes over :class:`services.serving.RMServing`, and every
error mapped to HTTP in one place with the one error body
``{"error": {"type", "message", "field", "rm"}}`` (:mod:`services.errors`).

>>> app.include_router(router)               # doctest: +SKIP
>>> install_error_handlers(app, settings)    # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from reward_router import http as shared_http
from reward_router.protocol import (
    CompareRequest,
    CompareResponse,
    InfoResponse,
    ScoreRequest,
    ScoreResponse,
)
from services.errors import (
    BodyTooLarge,
    InvalidInput,
    ModelError,
    Overloaded,
    ServiceError,
    Unauthorized,
)
from services.serving import RMServing
from services.settings import ServiceSettings

log = logging.getLogger("reward_router.services")

#: Routes left out of request metrics (scrapes and probes would drown the real traffic).
UNMETERED = frozenset({"/metrics", "/healthz", "/readyz"})
#: Routes open without ``api_key``: probes and the Prometheus scrape (it sends no credentials).
#: Every other route, including any added later, needs the key when one is configured.
OPEN_PATHS = UNMETERED
_bearer = HTTPBearer(auto_error=False, description="the service's api_key (when configured)")
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _serving(request: Request) -> RMServing:
    rm: RMServing = request.app.state.rm
    return rm


#: What a route needs: the app's serving object (built in the lifespan).
Serving = Annotated[RMServing, Depends(_serving)]


async def require_key(request: Request, creds: _Credentials) -> None:
    """The app-wide dependency: the bearer ``api_key`` when one is configured."""
    settings: ServiceSettings = request.app.state.settings
    if settings.api_key is None or request.url.path in OPEN_PATHS:
        return
    if creds is None:
        msg = "missing API key: send 'Authorization: Bearer <key>'"
        raise Unauthorized(msg, field="authorization")
    if not shared_http.key_matches(creds.credentials, [settings.api_key.get_secret_value()]):
        raise Unauthorized("invalid API key", field="authorization")


router = APIRouter()


@router.post("/v1/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, rm: Serving) -> ScoreResponse:
    return await rm.score(body)


@router.post("/v1/compare", response_model=CompareResponse)
async def compare(body: CompareRequest, rm: Serving) -> CompareResponse:
    return await rm.compare(body)


@router.get("/v1/info", response_model=InfoResponse)
async def info(rm: Serving) -> InfoResponse:
    return rm.info()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(rm: Serving) -> dict[str, str]:
    rm.check_ready()
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(rm: Serving) -> Response:
    return Response(generate_latest(rm.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---- errors -> HTTP, in one place -----------------------------------------------------------


def field_path(loc: Sequence[Any]) -> str | None:
    """``("body", "items", 0, "prompt", "list[Message]", 1, "role")`` ->
    ``"items[0].prompt[1].role"``."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part) in _TYPE_NAMES:
            continue  # a union branch's type name, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or None


class ErrorRenderer:
    """Renders every refusal of one RM service in the one error body (and counts it)."""

    def __init__(self, app: FastAPI, settings: ServiceSettings) -> None:
        self.app = app
        self.settings = settings

    def error(self, exc: ServiceError) -> JSONResponse:
        exc.rm = exc.rm or self.settings.name
        rm = getattr(self.app.state, "rm", None)
        if rm is not None:
            rm.metrics.errors.labels(self.settings.name, exc.type).inc()
        headers = {"www-authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        if isinstance(exc, Overloaded):
            headers = {"retry-after": str(self.settings.retry_after_s), "connection": "close"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def too_large(self, exc: shared_http.BodyTooLarge) -> JSONResponse:  # max_body_bytes
        return self.error(BodyTooLarge(str(exc.detail), field="body"))

    def plain(self, type_: str, exc: StarletteHTTPException, field: str | None) -> JSONResponse:
        body = {"type": type_, "message": str(exc.detail), "field": field}
        return JSONResponse(
            {"error": {**body, "rm": self.settings.name}},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    def refused(self, exc: StarletteHTTPException) -> JSONResponse:  # 503 overloaded, 408
        if isinstance(exc, shared_http.Overloaded):
            return self.error(Overloaded(str(exc.detail)))
        return self.plain("body_timeout", exc, "body")

    def validation(self, exc: RequestValidationError) -> JSONResponse:
        # For a union (prompt: str | messages) every branch reports; the deepest location is
        # the one that says what is wrong (e.g. items[0].prompt[2].role, not "not a string").
        errors = list(exc.errors())
        err = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
        field = field_path(err.get("loc", ()))
        msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            field, msg = "body", "request body is not valid JSON"
        field = field or "body"  # the body itself is wrong (missing, not an object)
        return self.error(InvalidInput(f"{field}: {msg}", field=field))

    def http(self, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own errors (404, 405, an unreadable body) get the one error body too.
        if isinstance(exc, shared_http.BodyTooLarge):  # over max_body_bytes while being read
            return self.too_large(exc)
        unparsable = shared_http.unparsable_body(exc)
        if unparsable is not None:  # as invalid JSON: RFC 8259 JSON text is UTF-8
            return self.error(InvalidInput(unparsable, field="body"))
        return self.plain("http_error", exc, None)


def install_error_handlers(app: FastAPI, settings: ServiceSettings) -> ErrorRenderer:
    """Every error -> one HTTP status and the one error body; returns the renderer (for the
    middlewares' own refusals)."""
    render = ErrorRenderer(app, settings)

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return render.error(exc)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return render.validation(exc)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return render.http(exc)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in rm %s", settings.name)
        return render.error(ModelError(f"{type(exc).__name__}: {exc}"))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
    return render
