"""RM clients against a real RM service process: timeouts, cooldown and its way back, 4xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.rm_client import RMClient, RMRejected, RMUnavailable
from tests.gateway.helpers import start_rm
from tests.procs import Proc, free_port

PAIR = {"prompt": "2+2?", "response_a": "the answer is four", "response_b": "4"}


@pytest.fixture(scope="module")
def rm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_rm(tmp_path_factory.mktemp("rm"), "len")
    try:
        yield proc
    finally:
        proc.kill()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_compare_in_chunks(rm: Proc) -> None:
    client = RMClient("len", rm.url, max_batch=2)
    try:
        res = await client.compare([PAIR] * 5)
    finally:
        await client.aclose()
    assert len(res) == 5
    assert all(r.preferred == "a" and r.score_a > r.score_b for r in res)  # longer wins


async def test_cooldown_after_repeated_failures_and_way_back(rm: Proc) -> None:
    clock = Clock()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    client = RMClient("x", dead, failure_threshold=2, cooldown_s=5.0, clock=clock)
    try:
        with pytest.raises(RMUnavailable):
            await client.compare([PAIR])
        assert client.available() and client.consecutive_failures == 1
        with pytest.raises(RMUnavailable):
            await client.compare([PAIR])
        assert client.in_cooldown() and not client.available()
        clock.t += 5.1  # cooldown over: half-open, a request may try it again
        assert client.available()
        # The RM comes back (same client, now pointed at the live service): one success clears it
        client._http.base_url = rm.url
        assert (await client.compare([PAIR]))[0].preferred == "a"
        assert client.consecutive_failures == 0 and client.available()
    finally:
        await client.aclose()


async def test_health_check_marks_unavailable_then_back(rm: Proc) -> None:
    client = RMClient("x", f"http://127.0.0.1:{free_port()}")
    try:
        assert not await client.check_health()
        assert not client.available()
        client._http.base_url = rm.url
        assert await client.check_health()
        assert client.available()
    finally:
        await client.aclose()


async def test_bad_input_is_rejected_without_cooldown(rm: Proc) -> None:
    client = RMClient("len", rm.url, failure_threshold=1)
    try:
        for _ in range(3):
            with pytest.raises(RMRejected) as info:
                await client.compare([{"prompt": "x", "response_a": "a"}])
            assert info.value.status == 422
        assert client.consecutive_failures == 0 and client.available()
    finally:
        await client.aclose()


async def test_read_timeout_is_a_failure(tmp_path: Path) -> None:
    import socket

    # A server that accepts connections and never answers: only the read timeout can end it.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    client = RMClient("slow", url, read_timeout_s=0.2, failure_threshold=1, cooldown_s=60)
    try:
        with pytest.raises(RMUnavailable, match="ReadTimeout"):
            await client.compare([PAIR])
        assert client.in_cooldown()
    finally:
        await client.aclose()
        srv.close()


async def test_concurrent_calls_merge_and_only_the_bad_caller_is_rejected(rm: Proc) -> None:
    import asyncio

    client = RMClient("len", rm.url, max_batch=8, failure_threshold=1)
    try:
        good = [PAIR, {**PAIR, "response_a": "4"}]
        bad = [{"prompt": "x", "response_a": "a"}]
        out = await asyncio.gather(
            client.compare(good),
            client.compare(bad),
            client.compare([PAIR] * 10),  # more than max_batch: split over calls
            return_exceptions=True,
        )
        assert isinstance(out[1], RMRejected)
        assert isinstance(out[0], list) and [c.preferred for c in out[0]] == ["a", "tie"]
        assert isinstance(out[2], list) and len(out[2]) == 10
        assert client.available()
    finally:
        await client.aclose()
