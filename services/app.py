"""The scoring service's HTTP layer: :func:`create_app` builds one FastAPI app for one RM.

Nothing happens at import time. At start-up (lifespan) the backend is built and loaded in the
forward-pass thread while the server already answers ``/healthz`` (``/readyz`` says 503 until
the model is in memory). Requests are validated here, queued on a micro-batcher, and answered
in order; every error leaves through ``error_response`` with the one error body.

>>> app = create_app(load_settings("deploy/rms/length.yaml"))   # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8105)                # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from reward_router import http as shared_http
from reward_router.data import Message
from services.backends import Backend, Compared, PairInput, Scored, ScoreInput, make_backend
from services.batching import MicroBatcher, QueueFull
from services.errors import (
    BatchTooLarge,
    BodyTooLarge,
    InputTooLong,
    InvalidInput,
    ModelError,
    NotReady,
    Overloaded,
    RequestTimeout,
    ServiceError,
    Unauthorized,
)
from services.metrics import ServiceMetrics
from services.protocol import (
    ChatMessage,
    CompareRequest,
    CompareResponse,
    CompareResult,
    ErrorBody,
    InfoResponse,
    ScoreRequest,
    ScoreResponse,
)
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


class ServiceState:
    """Everything the routes need, built once per app and kept on ``app.state.rm``."""

    def __init__(self, settings: ServiceSettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = ServiceMetrics(settings.name)
        # One thread: forward passes run one at a time, off the event loop. The model is not
        # assumed thread-safe, and torch already uses every core inside one pass.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rm-{settings.name}")
        self.ready = False
        self.load_error: str | None = None
        self.score_batcher: MicroBatcher[ScoreInput, Scored] | None = None
        self.compare_batcher: MicroBatcher[PairInput, Compared] | None = None

    def batcher(self, fn: Callable[[list[Any]], list[Any]]) -> MicroBatcher[Any, Any]:
        s, m = self.settings, self.metrics

        def on_batch(size: int, seconds: float) -> None:
            m.batch_size.labels(s.name).observe(size)
            m.forward.labels(s.name).observe(seconds)

        return MicroBatcher(
            fn,
            max_batch=s.max_batch_size,
            max_wait_s=s.batch_wait_ms / 1000.0,
            executor=self.executor,
            enabled=s.microbatch,
            on_batch=on_batch,
            on_queue=lambda n: m.queue.labels(s.name).set(n),
            max_queued=s.max_queued_items,
        )

    async def load(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.backend.load)
        except Exception as exc:  # a service that cannot load says why on /readyz
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("rm %s failed to load: %s", self.settings.name, self.load_error)
            return
        self.score_batcher = self.batcher(self.backend.score_batch)
        await self.score_batcher.start()
        if self.backend.pairwise:
            self.compare_batcher = self.batcher(self.backend.compare_batch)
            await self.compare_batcher.start()
        self.ready = True
        self.metrics.ready.labels(self.settings.name).set(1)
        log.info(
            "rm %s ready (%s, %s)", self.settings.name, self.backend.kind, self.backend.model_ref
        )

    async def close(self) -> None:
        for b in (self.score_batcher, self.compare_batcher):
            if b is not None:
                await b.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.backend.close()


def _field_path(loc: Sequence[Any]) -> str | None:
    """``("body", "items", 0, "prompt", "list[ChatMessage]", 1, "role")`` ->
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


def _messages(prompt: str | list[ChatMessage], field: str) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not prompt:
        raise InvalidInput(f"{field}: a message list must not be empty", field=field)
    return [{"role": m.role, "content": m.content} for m in prompt]


def _check_size(n: int, field: str, settings: ServiceSettings) -> None:
    if n == 0:
        raise InvalidInput(f"{field}: must not be empty", field=field)
    if n > settings.max_request_items:
        raise BatchTooLarge(
            f"{field}: {n} entries, more than this service's max_request_items "
            f"({settings.max_request_items}); split the request",
            field=field,
        )


def _refuse_too_long(flags: Sequence[bool], field: str, settings: ServiceSettings) -> None:
    """422 naming the first entry that does not fit (only under truncation ``error``)."""
    for i, too_long in enumerate(flags):
        if too_long:
            raise InputTooLong(
                f"{field}[{i}]: longer than max_length ({settings.max_length} tokens) and "
                "truncation is 'error'",
                field=f"{field}[{i}]",
            )


def _finite(value: float, rm: str) -> float:
    if not math.isfinite(value):
        raise ModelError(f"rm {rm!r} produced a non-finite score ({value})", rm=rm)
    return value


def _preferred(a: float, b: float, eps: float) -> str:
    if abs(a - b) <= eps:
        return "tie"
    return "a" if a > b else "b"


def create_app(settings: ServiceSettings, backend: Backend | None = None) -> FastAPI:
    """The FastAPI app of one RM service; ``backend`` defaults to the one the settings name."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for warning in settings.startup_warnings():
            log.warning("rm %s: %s", settings.name, warning)
        state = ServiceState(settings, backend or make_backend(settings))
        app.state.rm = state
        loading = asyncio.create_task(state.load(), name="rm-load")
        try:
            yield
        finally:
            loading.cancel()
            await state.close()

    async def require_key(request: Request, creds: _Credentials) -> None:
        if settings.api_key is None or request.url.path in OPEN_PATHS:
            return
        if creds is None:
            msg = "missing API key: send 'Authorization: Bearer <key>'"
            raise Unauthorized(msg, field="authorization")
        expected = settings.api_key.get_secret_value().encode()
        if not hmac.compare_digest(creds.credentials.encode(), expected):
            raise Unauthorized("invalid API key", field="authorization")

    app = FastAPI(
        title=f"reward-router RM service ({settings.name})",
        lifespan=lifespan,
        responses={422: {"model": ErrorBody}, 503: {"model": ErrorBody}},
        # App-wide, so a route added later is closed by default; OPEN_PATHS are let through.
        dependencies=[Depends(require_key)],
    )

    def state_of(request: Request) -> ServiceState:
        st: ServiceState = request.app.state.rm
        return st

    def error_response(exc: ServiceError) -> JSONResponse:
        exc.rm = exc.rm or settings.name
        st = getattr(app.state, "rm", None)
        if st is not None:
            st.metrics.errors.labels(settings.name, exc.type).inc()
        headers = {"www-authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        if isinstance(exc, Overloaded):
            headers = {"retry-after": str(settings.retry_after_s), "connection": "close"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def too_large(exc: shared_http.BodyTooLarge) -> JSONResponse:  # max_body_bytes
        return error_response(BodyTooLarge(str(exc.detail), field="body"))

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # For a union (prompt: str | messages) every branch reports; the deepest location is
        # the one that says what is wrong (e.g. items[0].prompt[2].role, not "not a string").
        errors = list(exc.errors())
        err = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
        field = _field_path(err.get("loc", ()))
        msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            field, msg = "body", "request body is not valid JSON"
        field = field or "body"  # the body itself is wrong (missing, not an object)
        return error_response(InvalidInput(f"{field}: {msg}", field=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own errors (404, 405, an unreadable body) get the one error body too.
        if isinstance(exc, shared_http.BodyTooLarge):  # over max_body_bytes while the body was read
            return too_large(exc)
        unparsable = shared_http.unparsable_body(exc)
        if unparsable is not None:  # as invalid JSON: RFC 8259 JSON text is UTF-8
            return error_response(InvalidInput(unparsable, field="body"))
        body = {"type": "http_error", "message": str(exc.detail), "field": None}
        return JSONResponse(
            {"error": {**body, "rm": settings.name}},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in rm %s", settings.name)
        return error_response(ModelError(f"{type(exc).__name__}: {exc}"))

    # Added before the metering middleware, so it runs inside it: refused bodies are counted.
    app.add_middleware(shared_http.BodyLimit, max_bytes=settings.max_body_bytes, refuse=too_large)

    @app.middleware("http")
    async def _metered(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if path in UNMETERED:
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
            st = getattr(request.app.state, "rm", None)
            if st is not None:
                m = st.metrics
                m.requests.labels(settings.name, endpoint, str(status)).inc()
                m.latency.labels(settings.name, endpoint).observe(time.perf_counter() - t0)

    async def run(
        st: ServiceState, batcher: MicroBatcher[Any, Any] | None, items: Sequence[Any]
    ) -> list[Any]:
        if not st.ready or batcher is None:
            reason = st.load_error or "model is loading"
            raise NotReady(f"rm {settings.name!r} is not ready: {reason}")
        try:
            async with asyncio.timeout(settings.request_timeout_s):
                return await batcher.submit(items)
        except QueueFull as exc:
            raise Overloaded(
                f"rm {settings.name!r} is overloaded: {exc} (max_queued_items "
                f"{settings.max_queued_items}); retry after {settings.retry_after_s} s"
            ) from None
        except TimeoutError as exc:
            raise RequestTimeout(
                f"rm {settings.name!r} did not answer within {settings.request_timeout_s}s"
            ) from exc
        except ServiceError:
            raise
        except Exception as exc:  # the backend raised inside the forward pass
            raise ModelError(f"rm {settings.name!r} failed: {type(exc).__name__}: {exc}") from exc

    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
        st = state_of(request)
        _check_size(len(body.items), "items", settings)
        st.metrics.items.labels(settings.name, "/v1/score").inc(len(body.items))
        inputs = [
            ScoreInput(_messages(it.prompt, f"items[{i}].prompt"), it.response, it.reference)
            for i, it in enumerate(body.items)
        ]
        results: list[Scored] = await run(st, st.score_batcher, inputs)
        _refuse_too_long([r.too_long for r in results], "items", settings)
        truncated = [i for i, r in enumerate(results) if r.truncated]
        st.metrics.truncated.labels(settings.name).inc(len(truncated))
        return ScoreResponse(
            model=settings.name,
            scores=[_finite(r.score, settings.name) for r in results],
            truncated=truncated,
            abstained=[i for i, r in enumerate(results) if r.abstained],
        )

    @app.post("/v1/compare", response_model=CompareResponse)
    async def compare(body: CompareRequest, request: Request) -> CompareResponse:
        st = state_of(request)
        _check_size(len(body.pairs), "pairs", settings)
        st.metrics.items.labels(settings.name, "/v1/compare").inc(len(body.pairs))
        prompts = [_messages(p.prompt, f"pairs[{i}].prompt") for i, p in enumerate(body.pairs)]
        compared: list[Compared]
        if st.backend.pairwise:
            pairs = [
                PairInput(m, p.response_a, p.response_b, p.reference)
                for m, p in zip(prompts, body.pairs, strict=True)
            ]
            compared = await run(st, st.compare_batcher, pairs)
        else:
            # Pointwise RM: both sides of every pair go into the same micro-batch.
            flat = [
                ScoreInput(m, resp, p.reference)
                for m, p in zip(prompts, body.pairs, strict=True)
                for resp in (p.response_a, p.response_b)
            ]
            scored: list[Scored] = await run(st, st.score_batcher, flat)
            compared = [
                Compared(
                    a.score,
                    b.score,
                    truncated=a.truncated or b.truncated,
                    abstained=a.abstained or b.abstained,
                    too_long=a.too_long or b.too_long,
                )
                for a, b in zip(scored[0::2], scored[1::2], strict=True)
            ]
        _refuse_too_long([c.too_long for c in compared], "pairs", settings)
        results: list[CompareResult] = []
        for c, p in zip(compared, body.pairs, strict=True):
            a, b = _finite(c.score_a, settings.name), _finite(c.score_b, settings.name)
            # An abstaining RM (verifier without reference) has no preference: a tie. So are two
            # identical responses, whatever float noise their separate micro-batches left.
            same = p.response_a == p.response_b
            pref = "tie" if c.abstained or same else _preferred(a, b, settings.tie_epsilon)
            results.append(CompareResult(score_a=a, score_b=b, preferred=pref))  # type: ignore[arg-type]
        truncated = [i for i, c in enumerate(compared) if c.truncated]
        st.metrics.truncated.labels(settings.name).inc(len(truncated))
        return CompareResponse(
            model=settings.name,
            results=results,
            truncated=truncated,
            abstained=[i for i, c in enumerate(compared) if c.abstained],
        )

    @app.get("/v1/info", response_model=InfoResponse)
    async def info(request: Request) -> InfoResponse:
        st = state_of(request)
        return InfoResponse(
            name=settings.name,
            backend=settings.backend,
            model=st.backend.model_ref,
            pairwise=st.backend.pairwise,
            max_batch_size=settings.max_batch_size,
            max_request_items=settings.max_request_items,
            max_length=settings.max_length,
            truncation=settings.truncation,
            microbatch=settings.microbatch,
            ready=st.ready,
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> dict[str, str]:
        st = state_of(request)
        if not st.ready:
            raise NotReady(f"rm {settings.name!r} is not ready: {st.load_error or 'loading'}")
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(
            generate_latest(state_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    def refused(exc: StarletteHTTPException) -> JSONResponse:  # 503 overloaded, 408 body timeout
        if isinstance(exc, shared_http.Overloaded):
            return error_response(Overloaded(str(exc.detail)))
        body = {"type": "body_timeout", "message": str(exc.detail), "field": "body"}
        return JSONResponse(
            {"error": {**body, "rm": settings.name}},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    def cancelled() -> None:
        st = getattr(app.state, "rm", None)
        if st is not None:
            st.metrics.cancelled.labels(settings.name).inc()

    # Added last, so it is the outermost layer: an overloaded service refuses before reading.
    app.add_middleware(
        shared_http.RequestGuard,
        max_in_flight=settings.max_in_flight,
        retry_after_s=settings.retry_after_s,
        body_timeout_s=settings.body_timeout_s,
        refuse=refused,
        exempt=UNMETERED,
        on_cancel=cancelled,
    )
    return app
