"""HTTP clients of the gateway: :class:`GatewayClient` (sync) and :class:`AsyncGatewayClient`.

Light on purpose (httpx + pydantic, no torch): any trainer imports it. The request and
response models are the gateway's own (``reward_router.protocol``), so the two cannot drift.

Resilience is explicit:

* timeouts: :class:`Timeouts` (connect fails fast; read waits for a real RM's batch);
* errors: the typed tree in :mod:`trainer_client.errors`;
* retries (:class:`RetryPolicy`) only where repeating is safe. ``feedback`` is applied exactly
  once per route id by the gateway, so it is retried on every transient failure. ``route``
  stores route records, and the gateway takes no request id that would make a repeat
  idempotent, so it is retried only when the request certainly stored nothing: the connection
  was never made, or the gateway answered 503 ``rms_unavailable`` (it fails before storing).

>>> from trainer_client import GatewayClient
>>> with GatewayClient("http://127.0.0.1:8080", api_key="k") as gw:      # doctest: +SKIP
...     res = gw.route([{"prompt": "2+2?", "response_a": "4", "response_b": "5"}],
...                    namespace="run-1")
...     gw.feedback({r.route_id: -0.69 for r in res.results})
FeedbackResponse(applied=1, duplicate=0, unknown=0)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, RootModel, ValidationError

from reward_router.protocol import (
    FeedbackItem,
    FeedbackRequest,
    FeedbackResponse,
    NamespaceConfig,
    NamespaceInfo,
    PairIn,
    PosteriorsResponse,
    RouteRequest,
    RouteResponse,
)
from trainer_client.errors import (
    GatewayError,
    GatewayTimeout,
    GatewayUnavailable,
    GatewayUnreachable,
    InvalidRequest,
    ResponseFormatError,
    api_error,
)

PairLike = PairIn | Mapping[str, Any]
FeedbackLike = Mapping[str, float] | Iterable[tuple[str, float]] | Iterable[FeedbackItem]
M = TypeVar("M", bound=BaseModel)

__all__ = [
    "AsyncGatewayClient",
    "GatewayClient",
    "RetryPolicy",
    "Timeouts",
]


@dataclass(frozen=True)
class Timeouts:
    """Seconds per phase of one HTTP request.

    ``connect`` is short because a gateway that is down refuses at once; ``read`` covers the
    slowest RM behind the gateway for a whole batch (a 7B judge on a large batch takes tens of
    seconds), so it is long.

    >>> Timeouts(read=5).as_httpx().read
    5
    """

    connect: float = 3.0
    read: float = 120.0
    write: float = 30.0
    pool: float = 10.0

    def as_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait between tries of a call that is safe to repeat.

    Exponential backoff ``base_s * 2**i`` capped at ``max_s``. Defaults: 4 retries over about
    7.5 s ride out a gateway restart (a replica starts in a few seconds) without stalling a
    training step for long; the trainer process adds its own longer, logged wait on top.

    >>> list(RetryPolicy(retries=4, base_s=0.5, max_s=2.0).delays())
    [0.5, 1.0, 2.0, 2.0]
    """

    retries: int = 4
    base_s: float = 0.5
    max_s: float = 4.0

    def delays(self) -> Iterator[float]:
        for i in range(self.retries):
            yield min(self.max_s, self.base_s * 2**i)


NO_RETRY = RetryPolicy(retries=0)


class _AnyDict(RootModel[dict[str, Any]]):
    """An object answer kept as a plain dict (``/v1/info`` has no fixed model)."""


# ---- shared request building and answer parsing (sync and async differ only in sending) ------


def _headers(api_key: str | None) -> dict[str, str]:
    h = {"accept": "application/json", "user-agent": "reward-router-trainer-client/0.1"}
    if api_key:
        h["authorization"] = f"Bearer {api_key}"
    return h


def _ns_body(config: NamespaceConfig | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if config is None:
        return None
    return NamespaceConfig.model_validate(config).model_dump(exclude_none=True)


def _route_body(pairs: Sequence[PairLike], namespace: str) -> dict[str, Any]:
    try:
        # Validated as one request so a bad field is named as the gateway names it.
        raw = [p.model_dump(exclude_none=True) if isinstance(p, PairIn) else dict(p) for p in pairs]
        req = RouteRequest.model_validate({"namespace": namespace, "pairs": raw})
    except ValidationError as exc:
        raise _invalid(exc) from None
    return req.model_dump(mode="json", exclude_none=True)


def _feedback_body(items: FeedbackLike) -> dict[str, Any]:
    raw: Iterable[Any] = items.items() if isinstance(items, Mapping) else items
    try:
        fb = [
            it if isinstance(it, FeedbackItem) else FeedbackItem(route_id=it[0], reward=it[1])
            for it in raw
        ]
        req = FeedbackRequest(feedback=fb)
    except ValidationError as exc:
        raise _invalid(exc) from None
    return req.model_dump(mode="json")


def _invalid(exc: ValidationError) -> InvalidRequest:
    """A request refused before sending, with the same error type the gateway would give."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return InvalidRequest(0, "validation_error", f"{field}: {first['msg']}", field)


def _parse(resp: httpx.Response, model: type[M]) -> M:
    if resp.status_code >= 400:
        try:
            body = resp.json()
        except ValueError:
            body = None
        raise api_error(resp.status_code, body, resp.text)
    try:
        return model.model_validate_json(resp.content)
    except ValidationError as exc:
        raise ResponseFormatError(
            f"{resp.request.method} {resp.request.url.path}: answer is not a "
            f"{model.__name__}: {exc.errors()[0]['msg']}"
        ) from None


def _transport_error(exc: httpx.TransportError, url: str) -> GatewayUnreachable:
    # A failed connect (or waiting for a pool slot) means the request never left this process.
    sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    if isinstance(exc, httpx.TimeoutException):
        return GatewayTimeout(f"{url}: {type(exc).__name__} ({exc})", sent=sent)
    return GatewayUnreachable(f"{url}: cannot reach the gateway ({exc!r})", sent=sent)


Safety = Literal["idempotent", "unsent-only"]


def _may_retry(err: GatewayError, safety: Safety) -> bool:
    if not err.retryable:
        return False
    if safety == "idempotent":
        return True
    # Not idempotent: only when nothing can have been stored by the failed try.
    if isinstance(err, GatewayUnreachable):
        return not err.sent
    return isinstance(err, GatewayUnavailable) and err.type == "rms_unavailable"


class _Base:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeouts: Timeouts | None,
        retry: RetryPolicy | None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self._kwargs: dict[str, Any] = {
            "base_url": self.base_url,
            "headers": _headers(api_key),
            "timeout": self.timeouts.as_httpx(),
        }


class GatewayClient(_Base):
    """Blocking client of the gateway's trainer API.

    ``transport`` is for tests (e.g. ``httpx.MockTransport``); leave it unset otherwise. A client
    pickles as its settings (URL, key, timeouts, retries); the copy opens its own connections.

    >>> gw = GatewayClient("http://127.0.0.1:8080", timeouts=Timeouts(read=30))
    >>> gw.base_url
    'http://127.0.0.1:8080'
    >>> gw.close()
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key=api_key, timeouts=timeouts, retry=retry)
        self._api_key, self._transport = api_key, transport
        self._http = httpx.Client(transport=transport, **self._kwargs)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as its settings; the unpickled copy opens its own connection pool (TRL's
        AsyncGRPOTrainer pickles reward functions into a spawned process)."""
        if self._transport is not None:
            raise TypeError("a GatewayClient with a custom transport cannot be pickled")
        return {
            "base_url": self.base_url,
            "api_key": self._api_key,
            "timeouts": self.timeouts,
            "retry": self.retry,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, model: type[M], safety: Safety, **kw: Any) -> M:
        delays = iter(self.retry.delays())
        while True:
            try:
                try:
                    resp = self._http.request(method, path, **kw)
                except httpx.TransportError as exc:
                    raise _transport_error(exc, self.base_url + path) from exc
                return _parse(resp, model)
            except GatewayError as err:
                delay = next(delays, None) if _may_retry(err, safety) else None
                if delay is None:
                    raise
                time.sleep(delay)

    def route(self, pairs: Sequence[PairLike], *, namespace: str = "default") -> RouteResponse:
        """Label ``pairs``, each by one RM; results come back in the order of ``pairs``.

        >>> res = gw.route([{"prompt": "2+2?", "response_a": "4", "response_b": "5",
        ...                  "reference": "4"}], namespace="run-1")   # doctest: +SKIP
        >>> res.results[0].preferred, res.results[0].rm                # doctest: +SKIP
        ('a', 'verifier')
        """
        body = _route_body(pairs, namespace)
        return self._send("POST", "/v1/route", RouteResponse, "unsent-only", json=body)

    def feedback(self, items: FeedbackLike) -> FeedbackResponse:
        """Post rewards (−DPO loss) by route id; safe to repeat (each id is applied once).

        >>> gw.feedback({"run-1:0:3f2a": -0.41})                       # doctest: +SKIP
        FeedbackResponse(applied=1, duplicate=0, unknown=0)
        """
        body = _feedback_body(items)
        return self._send("POST", "/v1/feedback", FeedbackResponse, "idempotent", json=body)

    def posteriors(
        self, namespace: str = "default", *, detail: Literal["summary", "full"] = "summary"
    ) -> PosteriorsResponse:
        """Per RM: observations applied, routes, posterior summary, health.

        >>> [r.observations for r in gw.posteriors("run-1").rms]      # doctest: +SKIP
        [12, 0, 4]
        """
        params = {"namespace": namespace, "detail": detail}
        return self._send("GET", "/v1/posteriors", PosteriorsResponse, "idempotent", params=params)

    def create_namespace(
        self, namespace: str, config: NamespaceConfig | Mapping[str, Any] | None = None
    ) -> NamespaceInfo:
        """Create a namespace with its own policy; idempotent for the same config (409 else).
        ``route`` never creates one: call this once at the start of a run."""
        return self._send(
            "POST",
            f"/v1/namespaces/{namespace}",
            NamespaceInfo,
            "idempotent",
            json=_ns_body(config),
        )

    def info(self) -> dict[str, Any]:
        """The gateway's RMs, context dimension and (secret-free) settings."""
        return self._send("GET", "/v1/info", _AnyDict, "idempotent").root

    def ready(self) -> bool:
        """Whether the gateway says it is ready (its store and at least one RM answer)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncGatewayClient(_Base):
    """The same API as :class:`GatewayClient`, for asyncio trainers.

    >>> async def label(pairs):                                        # doctest: +SKIP
    ...     async with AsyncGatewayClient("http://127.0.0.1:8080") as gw:
    ...         return await gw.route(pairs, namespace="run-1")
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key=api_key, timeouts=timeouts, retry=retry)
        self._http = httpx.AsyncClient(transport=transport, **self._kwargs)

    async def __aenter__(self) -> AsyncGatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, model: type[M], safety: Safety, **kw: Any) -> M:
        delays = iter(self.retry.delays())
        while True:
            try:
                try:
                    resp = await self._http.request(method, path, **kw)
                except httpx.TransportError as exc:
                    raise _transport_error(exc, self.base_url + path) from exc
                return _parse(resp, model)
            except GatewayError as err:
                delay = next(delays, None) if _may_retry(err, safety) else None
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    async def route(
        self, pairs: Sequence[PairLike], *, namespace: str = "default"
    ) -> RouteResponse:
        """See :meth:`GatewayClient.route`."""
        body = _route_body(pairs, namespace)
        return await self._send("POST", "/v1/route", RouteResponse, "unsent-only", json=body)

    async def feedback(self, items: FeedbackLike) -> FeedbackResponse:
        """See :meth:`GatewayClient.feedback`."""
        body = _feedback_body(items)
        return await self._send("POST", "/v1/feedback", FeedbackResponse, "idempotent", json=body)

    async def posteriors(
        self, namespace: str = "default", *, detail: Literal["summary", "full"] = "summary"
    ) -> PosteriorsResponse:
        """See :meth:`GatewayClient.posteriors`."""
        params = {"namespace": namespace, "detail": detail}
        return await self._send(
            "GET", "/v1/posteriors", PosteriorsResponse, "idempotent", params=params
        )

    async def create_namespace(
        self, namespace: str, config: NamespaceConfig | Mapping[str, Any] | None = None
    ) -> NamespaceInfo:
        """See :meth:`GatewayClient.create_namespace`."""
        return await self._send(
            "POST",
            f"/v1/namespaces/{namespace}",
            NamespaceInfo,
            "idempotent",
            json=_ns_body(config),
        )

    async def info(self) -> dict[str, Any]:
        """See :meth:`GatewayClient.info`."""
        return (await self._send("GET", "/v1/info", _AnyDict, "idempotent")).root
