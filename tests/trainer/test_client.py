"""The gateway client: against a real gateway process (route, feedback, posteriors, typed
errors, auth), and its retry rules over ``httpx.MockTransport`` (which call is repeated when)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.helpers import gateway_config, start_gateway
from tests.procs import free_port
from trainer_client import (
    AsyncGatewayClient,
    AuthError,
    GatewayClient,
    GatewayServerError,
    GatewayTimeout,
    GatewayUnavailable,
    GatewayUnreachable,
    InvalidRequest,
    NamespaceNotFound,
    ResponseFormatError,
    RetryPolicy,
)

FAST = RetryPolicy(retries=3, base_s=0.0, max_s=0.0)


def _pairs(n: int, tag: str) -> list[dict[str, str]]:
    return [
        {"id": f"{tag}{i}", "prompt": f"what is {i}+1? ({tag})", "response_a": str(i + 1),
         "response_b": "a much longer wrong answer", "reference": str(i + 1)}
        for i in range(n)
    ]  # fmt: skip


# ---- against the real gateway ------------------------------------------------------------------


def test_route_feedback_posteriors_roundtrip(trainer_gateway: str) -> None:
    ns = "client-sync"
    with GatewayClient(trainer_gateway) as gw:
        assert gw.create_namespace(ns).namespace == ns  # a route never creates one
        res = gw.route(_pairs(5, "s"), namespace=ns)
        assert [r.id for r in res.results] == [f"s{i}" for i in range(5)]
        assert {r.rm for r in res.results} <= {"length", "verifier"}
        for r in res.results:
            # the verifier knows the reference; the length RM prefers the longer (wrong) side
            assert r.preferred == ("a" if r.rm == "verifier" else "b")
        fb = gw.feedback({r.route_id: -0.5 for r in res.results})
        assert (fb.applied, fb.duplicate, fb.unknown) == (5, 0, 0)
        # feedback is idempotent by route id: sending it again applies nothing
        again = gw.feedback([(r.route_id, -0.5) for r in res.results] + [("nope:0:x", 1.0)])
        assert (again.applied, again.duplicate, again.unknown) == (0, 5, 1)
        post = gw.posteriors(ns)
        assert sum(r.observations for r in post.rms) == 5
        assert gw.info()["rms"] == ["length", "verifier"]
        assert gw.ready()


def test_async_client_roundtrip(trainer_gateway: str) -> None:
    async def go() -> tuple[int, int]:
        async with AsyncGatewayClient(trainer_gateway) as gw:
            await gw.create_namespace("client-async")
            a, b = await asyncio.gather(
                gw.route(_pairs(3, "x"), namespace="client-async"),
                gw.route(_pairs(2, "y"), namespace="client-async"),
            )
            ids = {r.route_id: -0.3 for r in a.results + b.results}
            fb = await gw.feedback(ids)
            post = await gw.posteriors("client-async")
            return fb.applied, sum(r.observations for r in post.rms)

    assert asyncio.run(go()) == (5, 5)


def test_typed_errors_from_the_gateway(trainer_gateway: str) -> None:
    with GatewayClient(trainer_gateway) as gw:
        with pytest.raises(NamespaceNotFound) as nf:
            gw.posteriors("never-routed-here")
        assert nf.value.status == 404 and nf.value.field == "namespace"
        # refused before sending: the same field names as the gateway's 422
        with pytest.raises(InvalidRequest) as bad:
            gw.route([{"prompt": "p", "response_a": "a"}])
        assert bad.value.field == "pairs.0.response_b"
        with pytest.raises(InvalidRequest) as nan:
            gw.feedback({"r": float("nan")})
        assert nan.value.field is not None and "reward" in nan.value.field
        # refused by the gateway itself: a namespace name it does not accept
        with pytest.raises(InvalidRequest) as ns:
            gw.posteriors("bad:name")
        assert ns.value.status == 422


@pytest.fixture(scope="module")
def keyed_gateway(
    tmp_path_factory: pytest.TempPathFactory, trainer_rms: dict[str, str]
) -> Iterator[str]:
    """A second gateway (embedded store, intercept-only contexts) that requires an API key."""
    root: Path = tmp_path_factory.mktemp("keyed-gw")
    cfg = gateway_config(
        root, trainer_rms, api_keys=["sekret"], policy={"name": "bayesian-no-offline"}
    )
    proc = start_gateway(cfg)
    try:
        yield proc.url
    finally:
        proc.kill()


def test_api_key(keyed_gateway: str) -> None:
    with GatewayClient(keyed_gateway) as gw, pytest.raises(AuthError) as exc:
        gw.route(_pairs(1, "k"))
    assert exc.value.status == 401 and not exc.value.retryable
    with GatewayClient(keyed_gateway, api_key="wrong") as gw, pytest.raises(AuthError):
        gw.posteriors()
    with GatewayClient(keyed_gateway, api_key="sekret") as gw:
        assert len(gw.route(_pairs(2, "k")).results) == 2


def test_unreachable_gateway_is_a_typed_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with GatewayClient(url, retry=FAST) as gw, pytest.raises(GatewayUnreachable) as exc:
        gw.route(_pairs(1, "u"))
    assert exc.value.sent is False and exc.value.retryable


def test_bad_base_url() -> None:
    with pytest.raises(ValueError, match="base_url"):
        GatewayClient("127.0.0.1:8080")


# ---- retry rules (the transport stands in for a failing network / gateway) --------------------

ROUTE_OK = {
    "namespace": "default",
    "results": [{"route_id": "default:0:a", "rm": "length", "preferred": "a",
                 "score_a": 1.0, "score_b": 0.0}],
}  # fmt: skip
FB_OK = {"applied": 1, "duplicate": 0, "unknown": 0}


def _error_body(type_: str) -> dict[str, dict[str, str | None]]:
    return {"error": {"type": type_, "message": type_, "field": None}}


def _client(
    answers: list[Callable[[httpx.Request], httpx.Response]],
) -> tuple[GatewayClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[min(len(seen), len(answers)) - 1](request)

    gw = GatewayClient("http://gw", retry=FAST, transport=httpx.MockTransport(handler))
    return gw, seen


def _status(code: int, body: object) -> Callable[[httpx.Request], httpx.Response]:
    return lambda req: httpx.Response(code, json=body)


def _raise(exc: type[httpx.TransportError]) -> Callable[[httpx.Request], httpx.Response]:
    def f(req: httpx.Request) -> httpx.Response:
        raise exc("simulated", request=req)

    return f


def test_feedback_is_retried_on_transient_failures() -> None:
    gw, seen = _client(
        [_raise(httpx.ReadTimeout), _status(503, _error_body("store_unavailable")),
         _status(502, "bad gateway"), _status(200, FB_OK)]
    )  # fmt: skip
    assert gw.feedback({"default:0:a": -0.2}).applied == 1
    assert len(seen) == 4
    # every try carried the same body (same route ids: the gateway applies them once)
    assert len({r.content for r in seen}) == 1


def test_feedback_gives_up_after_the_policy_and_raises_the_last_error() -> None:
    gw, seen = _client([_status(503, _error_body("store_unavailable"))])
    with pytest.raises(GatewayUnavailable):
        gw.feedback({"x": 0.0})
    assert len(seen) == 1 + FAST.retries


def test_route_is_not_repeated_once_it_may_have_been_stored() -> None:
    for failure, err in [
        (_raise(httpx.ReadTimeout), GatewayTimeout),
        (_raise(httpx.RemoteProtocolError), GatewayUnreachable),
        (_status(503, _error_body("store_unavailable")), GatewayUnavailable),
        (_status(500, _error_body("internal_error")), GatewayServerError),
    ]:
        gw, seen = _client([failure, _status(200, ROUTE_OK)])
        with pytest.raises(err):
            gw.route(_pairs(1, "r"))
        assert len(seen) == 1, err


def test_route_is_repeated_when_nothing_was_stored() -> None:
    for failure in [_raise(httpx.ConnectError), _status(503, _error_body("rms_unavailable"))]:
        gw, seen = _client([failure, _status(200, ROUTE_OK)])
        assert gw.route(_pairs(1, "r")).results[0].rm == "length"
        assert len(seen) == 2


def test_client_errors_are_not_retried_and_bad_answers_are_typed() -> None:
    gw, seen = _client([_status(422, {"error": {"type": "invalid_input", "message": "too long",
                                                "field": "pairs.0.prompt"}})])  # fmt: skip
    with pytest.raises(InvalidRequest) as exc:
        gw.feedback({"x": 1.0})
    assert exc.value.field == "pairs.0.prompt" and len(seen) == 1
    gw, _ = _client([_status(200, {"unexpected": True})])
    with pytest.raises(ResponseFormatError, match="FeedbackResponse"):
        gw.feedback({"x": 1.0})
    gw, _ = _client([lambda req: httpx.Response(500, text="<html>oops</html>")])
    with pytest.raises(GatewayServerError) as srv:
        gw.posteriors()
    assert srv.value.status == 500 and "oops" in srv.value.message


def test_api_key_header_is_sent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=FB_OK)

    gw = GatewayClient("http://gw", api_key="k1", transport=httpx.MockTransport(handler))
    gw.feedback([("a", 1.0)])
    assert seen[0].headers["authorization"] == "Bearer k1"
    assert json.loads(seen[0].content) == {"feedback": [{"route_id": "a", "reward": 1.0}]}
