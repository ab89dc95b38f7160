"""Overload and slow clients, on real processes: the gateway and an RM service bound the work
in flight (503 + Retry-After past the limit), close connections whose headers are too slow,
answer 408 to bodies that are too slow, and cancel the work of a client that went away, down
to the RM's queue (the abandoned pairs never reach a forward pass).

The figures at twice capacity are a benchmark: ``benchmarks/bench_overload.py``.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.helpers import gateway_config, pairs, start_gateway, start_rm
from tests.procs import Proc, free_port, start_process

SLOW_S = 1.0  # header and body deadlines of both services here


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M):
        total += float(m.group(1))
    return total


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """An RM that answers in 2 s (the stand-in's ``slow`` mode)."""
    port = free_port()
    args = [sys.executable, "-m", "tests.reliability.stand_in_rm", "--port", str(port)]
    proc = start_process(args, port, ready_url=f"http://127.0.0.1:{port}/readyz")
    httpx.post(f"{proc.url}/mode", json={"mode": "slow", "delay_s": 2.0}).raise_for_status()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def slow_rm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A real RM service whose batcher waits 1 s for company before each forward pass, with a
    queue of at most 8 pairs: a request sits in its queue long enough to be abandoned."""
    proc = start_rm(
        tmp_path_factory.mktemp("rm"),
        "len",
        backend="length",
        batch_wait_ms=1000,
        max_batch_size=64,
        max_queued_items=8,
        header_timeout_s=SLOW_S,
        body_timeout_s=SLOW_S,
    )
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, stand_in: Proc, slow_rm: Proc) -> Iterator[Proc]:
    cfg = gateway_config(
        tmp_path_factory.mktemp("gw"),
        {"slow": stand_in.url, "len": slow_rm.url},
        policy={"name": "best-single", "best_rm": "slow"},
        max_in_flight=4,
        header_timeout_s=SLOW_S,
        body_timeout_s=SLOW_S,
    )
    proc = start_gateway(cfg)
    try:
        r = httpx.post(
            f"{proc.url}/v1/namespaces/to-len", json={"policy": "best-single", "best_rm": "len"}
        )
        r.raise_for_status()
        yield proc
    finally:
        proc.kill()


def test_past_max_in_flight_the_gateway_answers_503_with_retry_after(gw: Proc) -> None:
    before = _metric(gw.url, "reward_router_gateway_overloaded_total")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            body = {"namespace": "default", "pairs": pairs(1)}
            sent = [asyncio.create_task(c.post("/v1/route", json=body)) for _ in range(12)]
            await asyncio.sleep(0.5)  # the first ones hold the 4 slots (the RM takes 2 s)
            health = await c.get("/healthz")  # probes are never refused
            assert health.status_code == 200
            return list(await asyncio.gather(*sent))

    got = asyncio.run(burst())
    codes = sorted(r.status_code for r in got)
    assert codes == [200] * 4 + [503] * 8, codes
    for r in got:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "overloaded"
    assert _metric(gw.url, "reward_router_gateway_overloaded_total") - before == 8
    # The slots are free again once the answers are out.
    assert (
        httpx.post(
            f"{gw.url}/v1/route", json={"namespace": "to-len", "pairs": pairs(1)}, timeout=30
        ).status_code
        == 200
    )


@pytest.mark.parametrize("which", ["gateway", "rm"])
def test_slow_headers_are_disconnected_and_slow_bodies_are_408(
    which: str, gw: Proc, slow_rm: Proc
) -> None:
    port = gw.port if which == "gateway" else slow_rm.port
    path = b"/v1/feedback" if which == "gateway" else b"/v1/compare"
    # Headers trickling: the server closes the connection after header_timeout_s.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(SLOW_S + 5)
        t0 = time.monotonic()
        assert s.recv(1024) == b""  # closed, nothing answered
        assert SLOW_S - 0.2 <= time.monotonic() - t0 <= SLOW_S + 3
    # Headers complete, body short of its Content-Length: 408 after body_timeout_s, closed.
    with socket.create_connection(("127.0.0.1", port)) as s:
        head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        s.sendall(head + b"content-length: 100\r\n\r\n" + b'{"feedback": [')
        s.settimeout(SLOW_S + 5)
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert SLOW_S - 0.2 <= time.monotonic() - t0 <= SLOW_S + 3
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"not received within" in data


def test_the_rm_queue_is_bounded_503_with_retry_after(slow_rm: Proc) -> None:
    def compare(n: int, tag: str) -> dict[str, object]:
        return {
            "pairs": [
                {"prompt": f"{tag}{i}", "response_a": "a", "response_b": "bb"} for i in range(n)
            ]
        }

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=slow_rm.url, timeout=30) as c:
            first = asyncio.create_task(c.post("/v1/compare", json=compare(8, "a")))
            await asyncio.sleep(0.3)  # 8 pairs waiting for the batcher (it waits 1 s)
            second = await c.post("/v1/compare", json=compare(4, "b"))
            return await first, second

    first, second = asyncio.run(go())
    assert first.status_code == 200, first.text
    assert second.status_code == 503 and second.headers["retry-after"] == "1", second.text
    assert second.json()["error"]["type"] == "overloaded"


def test_work_of_a_client_that_went_away_is_cancelled_down_to_the_rm(
    gw: Proc, slow_rm: Proc
) -> None:
    forwarded = _metric(slow_rm.url, "reward_router_rm_batch_size_sum")
    gw_cancelled = _metric(gw.url, "reward_router_gateway_cancelled_total")
    rm_cancelled = _metric(slow_rm.url, "reward_router_rm_cancelled_total")
    requests = _metric(slow_rm.url, "reward_router_rm_requests_total")
    for i in range(3):  # the client gives up after 0.3 s; the RM would start after 1 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{gw.url}/v1/route",
                timeout=0.3,
                json={"namespace": "to-len", "pairs": pairs(2, offset=50 + 2 * i)},
            )
    time.sleep(2.0)  # past the RM's batch wait: anything still queued would have run by now
    assert _metric(gw.url, "reward_router_gateway_cancelled_total") - gw_cancelled == 3
    # A call that had reached the RM's queue was cancelled there; one still being sent when
    # its caller left was cut off (or never sent). Not one pair reached a forward pass.
    assert _metric(slow_rm.url, "reward_router_rm_cancelled_total") - rm_cancelled >= 1
    assert _metric(slow_rm.url, "reward_router_rm_requests_total") - requests <= 3
    assert _metric(slow_rm.url, "reward_router_rm_batch_size_sum") == forwarded  # 0 scored


def test_settings_bound_the_knobs(tmp_path: Path) -> None:
    from gateway.settings import load_settings
    from reward_router.errors import ConfigError

    rms = [{"name": "a", "url": "http://h"}]
    for field, bad in (("max_in_flight", 0), ("header_timeout_s", 0), ("body_timeout_s", -1)):
        with pytest.raises(ConfigError, match=field):
            load_settings(None, rms=rms, **{field: bad})
