"""Small helpers shared by the benchmark scripts (percentiles, CPU time of a process).

The scripts put the repository root on ``sys.path`` before importing this module, so it is
importable as ``benchmarks.common`` both from a script and from the tests.

>>> pct([1.0, 2.0, 3.0, 4.0], 50)
2.5
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pct(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``xs`` (NaN for no samples)."""
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), load-independent cost."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawHTTP:
    """One keep-alive HTTP/1.1 connection on loopback, as lean as a load driver can be.

    A benchmark's driver shares the CPU with the servers it measures: httpx's connection pool
    costs ~8 ms of the driver's CPU per request at 200 connections, which capped a "direct"
    baseline at ~110 requests/s on 2 cores. This one writes the request and reads a
    ``Content-Length`` answer, nothing else (no chunked bodies, no redirects, no TLS).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """``POST path`` with a JSON ``body``: (status, lower-cased headers, body)."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + body)
        status = int((await self._reader.readline()).split()[1])
        headers: dict[str, str] = {}
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        data = await self._reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection") == "close":
            await self.close()
        return status, headers, data

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU time of each thread of a process so far (thread id -> seconds); the
    main thread's id is ``pid`` (in the gateway: the event loop; the others: the encoder's
    worker thread and the tokenizer's threads)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out
