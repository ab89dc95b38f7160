"""The gateway's HTTP layer: thin routes over :class:`gateway.service.GatewayService`.

Errors are mapped to HTTP here, in one place, all with the one body
``{"error": {"type", "message", "field"}}``::

    RequestValidationError, InputError, ConfigError, RMRejected   422 (field named)
    body over max_body_bytes                                       413
    body not UTF-8 or nested too deeply to parse                   422 (field "body")
    missing / wrong API key                                        401
    a trainer key on an admin endpoint                             403
    UnknownNamespace                                               404
    NamespaceConflict, NamespaceLimit (max_namespaces)             409
    AllRMsFailed, StoreUnavailable                                 503
    max_in_flight requests being served already                    503 + Retry-After
    body not received within body_timeout_s                        408

Auth: trainer endpoints need ``Authorization: Bearer <one of api_keys>`` when ``api_keys`` is
configured; admin endpoints need the ``admin_key`` when it is configured (and otherwise fall back
to the trainer rule). The admin key is accepted on trainer endpoints too.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.rm_client import RMRejected
from gateway.service import (
    AllRMsFailed,
    GatewayService,
    InputError,
    NamespaceConflict,
    UnknownNamespace,
)
from gateway.store import NamespaceLimit, StoreUnavailable
from reward_router.errors import ConfigError
from reward_router.http import BodyTooLarge, key_matches, unparsable_body
from reward_router.protocol import (
    ErrorBody,
    FeedbackRequest,
    FeedbackResponse,
    NamespaceConfig,
    NamespaceInfo,
    PosteriorsResponse,
    RouteRequest,
    RouteResponse,
)

log = logging.getLogger("reward_router.gateway")

OVERHEAD_HEADER = "x-reward-router-overhead-ms"
ENCODE_HEADER = "x-reward-router-encode-ms"
STORE_HEADER = "x-reward-router-store-ms"

_bearer = HTTPBearer(auto_error=False, description="API key (trainer) or admin key")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


class AuthError(Exception):
    """401: no key or an unknown key; 403: a known key without the right (trainer on admin)."""

    def __init__(self, message: str, status: int = 401) -> None:
        self.message = message
        self.status = status
        super().__init__(message)


def _service(request: Request) -> GatewayService:
    svc: GatewayService = request.app.state.service
    return svc


def trainer_keys(request: Request) -> list[str]:
    """The keys a trainer endpoint accepts (the trainer keys, and the admin key with them); an
    empty list when no ``api_keys`` are configured (an open gateway)."""
    s = _service(request).settings
    keys = [k.get_secret_value() for k in s.api_keys]
    if s.admin_key is not None and keys:
        keys.append(s.admin_key.get_secret_value())
    return keys


# The key checks are ``async def`` although they await nothing: FastAPI runs a plain ``def``
# dependency in its thread pool, a thread hop per request that cost ~0.2 ms of CPU per route
# under load (py-spy, benchmarks/bench_gateway.py).
async def require_trainer(request: Request, creds: Credentials) -> None:
    keys = trainer_keys(request)
    if not keys:
        return
    if creds is None:
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    if not key_matches(creds.credentials, keys):
        raise AuthError("invalid API key")


async def require_admin(request: Request, creds: Credentials) -> None:
    s = _service(request).settings
    if s.admin_key is None:
        await require_trainer(request, creds)
        return
    if creds is None:
        raise AuthError("missing admin key: send 'Authorization: Bearer <admin key>'")
    if not key_matches(creds.credentials, [s.admin_key.get_secret_value()]):
        if key_matches(creds.credentials, [k.get_secret_value() for k in s.api_keys]):
            raise AuthError("a trainer key may not call admin endpoints: send the admin key", 403)
        raise AuthError("invalid admin key")


def _error(status: int, type_: str, message: str, field: str | None = None) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, "field": field}}
    return JSONResponse(status_code=status, content=body)


def _loc(loc: Any) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    # Union members show up as extra loc entries ("str", "list[Message]"); they are not fields.
    return ".".join(p for p in parts if not p.startswith(("str", "list[", "function-"))) or "body"


#: Domain errors with one status, type and field whatever their message: exception class ->
#: (status, type, field); ``_OWN_FIELD``: the error names its own field (``exc.field``).
_OWN_FIELD = "<own>"
_DOMAIN: dict[type[Exception], tuple[int, str, str | None]] = {
    InputError: (422, "invalid_input", _OWN_FIELD),
    ConfigError: (422, "invalid_config", _OWN_FIELD),
    RMRejected: (422, "rejected_by_rm", "pairs"),
    UnknownNamespace: (404, "unknown_namespace", "namespace"),
    NamespaceConflict: (409, "namespace_conflict", "namespace"),
    AllRMsFailed: (503, "rms_unavailable", None),
}


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    cls = next(c for c in type(exc).__mro__ if c in _DOMAIN)
    status, kind, field = _DOMAIN[cls]
    if field == _OWN_FIELD:
        field = getattr(exc, "field", None)
    return _error(status, kind, str(exc), field)


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errs = exc.errors()
    # Of a union's alternatives, the deepest error is the most specific one.
    first = max(errs, key=lambda e: len(e.get("loc", ()))) if errs else {"loc": (), "msg": ""}
    field = _loc(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx")
        why = (ctx.get("error") if isinstance(ctx, dict) else None) or first["msg"]
        return _error(422, "invalid_json", f"body is not valid JSON: {why}", "body")
    msg = str(first.get("msg", "")).removeprefix("Value error, ")
    return _error(422, "validation_error", f"{field}: {msg}", field)


async def _auth(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AuthError)
    if exc.status == 403:
        return _error(403, "forbidden", exc.message, "authorization")
    resp = _error(401, "unauthorized", exc.message, "authorization")
    resp.headers["www-authenticate"] = "Bearer"
    return resp


async def _limit(request: Request, exc: Exception) -> JSONResponse:
    message = f"{exc}: delete a namespace (admin) or raise max_namespaces"
    return _error(409, "namespace_limit", message, "namespace")


async def _store(request: Request, exc: Exception) -> JSONResponse:
    _service(request).metrics.store_errors.inc()
    return _error(503, "store_unavailable", str(exc))


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, BodyTooLarge):
        return body_too_large(exc)
    unparsable = unparsable_body(exc)
    if unparsable is not None:  # as invalid JSON: RFC 8259 JSON text is UTF-8
        return _error(422, "invalid_json", unparsable, "body")
    return http_error(exc)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    # A key in the path (/k/{api_key}/get_reward) never reaches a log.
    path = re.sub(r"^/k/[^/]+/", "/k/***/", request.url.path)
    log.exception("unhandled error on %s", path)
    return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")


def install_error_handlers(app: FastAPI) -> None:
    """Every domain error -> one HTTP status and the one error body."""
    for cls in _DOMAIN:
        app.add_exception_handler(cls, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(AuthError, _auth)
    app.add_exception_handler(NamespaceLimit, _limit)
    app.add_exception_handler(StoreUnavailable, _store)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _internal)


def http_error(exc: StarletteHTTPException) -> JSONResponse:
    """Any other HTTP error in the one body, its headers kept (a 405's Allow, a 503's
    Retry-After, a 408's Connection: close)."""
    kind = {408: "body_timeout", 503: "overloaded"}.get(exc.status_code, "http_error")
    resp = _error(exc.status_code, kind, str(exc.detail))
    resp.headers.update(exc.headers or {})
    return resp


def body_too_large(exc: BodyTooLarge) -> JSONResponse:
    """The 413 of :class:`reward_router.http.BodyLimit` (``max_body_bytes``), in the one body."""
    return _error(413, "body_too_large", str(exc.detail), "body")


router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 422, 503)
}


@router.post(
    "/v1/route",
    response_model=RouteResponse,
    responses=_ERRORS,
    dependencies=[Depends(require_trainer)],
    summary="Label pairs, each by one RM drawn from the namespace's posterior",
)
async def route(body: RouteRequest, request: Request, response: Response) -> RouteResponse:
    svc = _service(request)
    out, timing = await svc.route(body)
    svc.metrics.overhead.labels("route").observe(timing.overhead)
    svc.metrics.route_store_wait.observe(timing.store_wait)
    response.headers[OVERHEAD_HEADER] = f"{timing.overhead * 1000:.3f}"
    response.headers[ENCODE_HEADER] = f"{timing.encode * 1000:.3f}"
    response.headers[STORE_HEADER] = f"{timing.store_wait * 1000:.3f}"
    return out


@router.post(
    "/v1/feedback",
    response_model=FeedbackResponse,
    responses=_ERRORS,
    dependencies=[Depends(require_trainer)],
    summary="The trainer's rewards (−DPO loss) for routed pairs; applied exactly once",
)
async def feedback(body: FeedbackRequest, request: Request, response: Response) -> FeedbackResponse:
    svc = _service(request)
    t0 = time.perf_counter()
    out = await svc.feedback(body)
    dt = time.perf_counter() - t0
    svc.metrics.overhead.labels("feedback").observe(dt)
    response.headers[OVERHEAD_HEADER] = f"{dt * 1000:.3f}"
    return out


@router.get(
    "/v1/posteriors",
    response_model=PosteriorsResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
    dependencies=[Depends(require_trainer)],
    summary="Per RM: observations, routes, posterior summary, health",
)
async def posteriors(
    request: Request,
    namespace: Annotated[str, Query(max_length=64)] = "default",
    detail: Annotated[Literal["summary", "full"], Query()] = "summary",
) -> PosteriorsResponse:
    return await _service(request).posteriors(namespace, full=detail == "full")


@router.get("/v1/namespaces", dependencies=[Depends(require_trainer)])
async def list_namespaces(request: Request) -> dict[str, list[str]]:
    return {"namespaces": await _service(request).list_namespaces()}


@router.post(
    "/v1/namespaces/{namespace}",
    response_model=NamespaceInfo,
    responses=_ERRORS,
    dependencies=[Depends(require_trainer)],
    summary="Create a namespace with its own policy (idempotent for the same config)",
)
async def create_namespace(
    namespace: str, request: Request, body: NamespaceConfig | None = None
) -> NamespaceInfo:
    return await _service(request).create_namespace(namespace, body)


@router.post(
    "/v1/namespaces/{namespace}/reset",
    response_model=NamespaceInfo,
    responses=_ERRORS,
    dependencies=[Depends(require_admin)],
    summary="Admin: back to the prior (the log and route records of the old state are dropped)",
)
async def reset_namespace(namespace: str, request: Request) -> NamespaceInfo:
    return await _service(request).reset_namespace(namespace)


@router.delete(
    "/v1/namespaces/{namespace}",
    responses=_ERRORS,
    dependencies=[Depends(require_admin)],
    summary="Admin: delete a namespace and its state",
)
async def delete_namespace(namespace: str, request: Request) -> dict[str, str]:
    await _service(request).delete_namespace(namespace)
    return {"deleted": namespace}


@router.get("/v1/info", dependencies=[Depends(require_trainer)])
async def info(request: Request) -> dict[str, Any]:
    svc = _service(request)
    return {
        "rms": svc.rm_names,
        "dim": svc.contexts.dim,
        "router": svc.contexts.router is not None,
        "default_config": svc.namespaces.default_config,
        "settings": svc.settings.safe_dict(),
    }


@router.get("/healthz", include_in_schema=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    checks = await _service(request).readiness()
    return JSONResponse(status_code=200 if checks["ready"] else 503, content=checks)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_service(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
