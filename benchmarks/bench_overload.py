"""Overload at twice capacity, slow clients and a flood of huge compares, on real processes.

Three runs, each printing its figures:

1. **Gateway at 2x capacity.** An RM that answers every compare call in ``--rm-delay`` seconds
   (the stand-in RM's ``slow`` mode) behind a gateway with ``max_in_flight = M``: its capacity
   is at most M / delay requests/s. An open-loop driver sends ``2 x`` that rate for
   ``--duration`` seconds. Printed: answers by status, how many 503s carried ``Retry-After``,
   any other error, latency of the 200s, the gateway's RSS and open file descriptors (start,
   peak, end).
2. **Slow clients.** ``--slow-clients`` connections send half a request line and headers, the
   same number send full headers and then a body short of its Content-Length; how many are
   still open after the header and body deadlines (+1 s), and the gateway's fds.
3. **RM flood.** ``--flood`` concurrent 1,024-pair compares to a real RM service (``length``
   backend): answers by status and the service's RSS (peak, and after), with its default
   ``max_in_flight`` / ``max_queued_items``.

    .venv/bin/python benchmarks/bench_overload.py               # defaults: M=8, delay 0.5 s
    .venv/bin/python benchmarks/bench_overload.py --duration 60 --max-in-flight 64
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import pct  # noqa: E402
from tests.gateway.helpers import gateway_config, start_gateway, start_rm  # noqa: E402
from tests.procs import Proc, free_port, start_process  # noqa: E402


class Sampler:
    """RSS and open fds of one process, sampled every 0.2 s in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.rss: list[int] = []
        self.fds: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        rss, fds = self.proc.memory_info().rss, self.proc.num_fds()
        self.rss.append(rss)
        self.fds.append(fds)
        return rss, fds

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


async def open_loop(url: str, rate: float, duration_s: float) -> tuple[Counter[str], list[float]]:
    """Send ``rate`` route requests/s for ``duration_s``; status counts and 200 latencies."""
    counts: Counter[str] = Counter()
    lat: list[float] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

        async def one(i: int) -> None:
            body = {"namespace": "default", "pairs": [
                {"prompt": f"q{i}", "response_a": "a", "response_b": "bb"}]}  # fmt: skip
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/route", json=body)
            except httpx.HTTPError as exc:
                counts[f"error {type(exc).__name__}"] += 1
                return
            if r.status_code == 200:
                lat.append(time.perf_counter() - t0)
                counts["200"] += 1
            elif r.status_code == 503 and r.headers.get("retry-after"):
                counts["503 + Retry-After"] += 1
            else:
                counts[f"{r.status_code} {r.text[:80]}"] += 1

        tasks = []
        start = time.perf_counter()
        n = int(rate * duration_s)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return counts, lat


def slow_clients(port: int, n: int, wait_s: float) -> tuple[int, int]:
    """``n`` slow-header and ``n`` slow-body connections; how many of each are open after
    ``wait_s``."""
    heads, bodies = [], []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\n")
        heads.append(s)
        b = socket.create_connection(("127.0.0.1", port))
        b.sendall(b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 1000\r\n\r\n{")  # fmt: skip
        bodies.append(b)
    time.sleep(wait_s)

    def still_open(s: socket.socket) -> bool:
        s.setblocking(False)
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    return False
        except BlockingIOError:
            return True
        except OSError:
            return False

    out = sum(still_open(s) for s in heads), sum(still_open(s) for s in bodies)
    for s in heads + bodies:
        s.close()
    return out


async def flood(url: str, n: int, pairs: int) -> Counter[str]:
    body = {"pairs": [{"prompt": f"p{i}", "response_a": "a " * 50, "response_b": "b " * 20}
                      for i in range(pairs)]}  # fmt: skip
    counts: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits()) as c:

        async def one() -> None:
            try:
                r = await c.post("/v1/compare", json=body)
                ok = r.status_code == 503 and r.headers.get("retry-after")
                counts["503 + Retry-After" if ok else str(r.status_code)] += 1
            except httpx.HTTPError as exc:
                counts[f"error {type(exc).__name__}"] += 1

        await asyncio.gather(*(one() for _ in range(n)))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-in-flight", type=int, default=8)
    ap.add_argument("--rm-delay", type=float, default=0.5)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--slow-clients", type=int, default=300)
    ap.add_argument("--flood", type=int, default=400)
    ap.add_argument("--flood-pairs", type=int, default=1024)
    args = ap.parse_args()
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            port = free_port()
            cmd = [sys.executable, "-m", "tests.reliability.stand_in_rm", "--port", str(port)]
            rm = start_process(cmd, port, ready_url=f"http://127.0.0.1:{port}/readyz")
            procs.append(rm)
            httpx.post(f"{rm.url}/mode", json={"mode": "slow", "delay_s": args.rm_delay})
            cfg = gateway_config(
                root, {"slow": rm.url}, policy={"name": "bayesian-no-offline"},
                max_in_flight=args.max_in_flight, header_timeout_s=5.0, body_timeout_s=5.0,
            )  # fmt: skip
            gw = start_gateway(cfg)
            procs.append(gw)
            capacity = args.max_in_flight / args.rm_delay
            rate = 2 * capacity
            print(f"1. gateway: max_in_flight {args.max_in_flight}, RM answers in "
                  f"{args.rm_delay} s -> capacity <= {capacity:.0f} req/s; driving {rate:.0f} "
                  f"req/s (2x) for {args.duration:.0f} s")  # fmt: skip
            t0 = time.perf_counter()
            with Sampler(gw.popen.pid) as s:
                counts, lat = asyncio.run(open_loop(gw.url, rate, args.duration))
            took = time.perf_counter() - t0
            ok = counts["200"]
            print(f"   answers: {dict(counts)}")
            print(
                f"   served {ok / took:.1f} req/s over {took:.1f} s; 200 latency p50 "
                f"{pct(lat, 50) * 1000:.0f} ms, p99 {pct(lat, 99) * 1000:.0f} ms"
            )
            print(
                f"   gateway RSS start {mib(s.rss[0])}, peak {mib(max(s.rss))}, end "
                f"{mib(s.rss[-1])}; fds start {s.fds[0]}, peak {max(s.fds)}, end {s.fds[-1]}"
            )

            n = args.slow_clients
            print(
                f"2. slow clients: {n} slow-header + {n} slow-body connections "
                "(header_timeout_s 5, body_timeout_s 5), checked after 6 s"
            )
            with Sampler(gw.popen.pid) as s:
                heads, bodies = slow_clients(gw.port, n, 6.0)
            print(
                f"   still open: {heads}/{n} slow-header, {bodies}/{n} slow-body; gateway "
                f"fds peak {max(s.fds)}, end {s.fds[-1]}"
            )
            ok = httpx.post(f"{gw.url}/v1/route", json={"pairs": [
                {"prompt": "p", "response_a": "a", "response_b": "b"}]}, timeout=30)  # fmt: skip
            print(f"   a route afterwards: {ok.status_code}")

            svc = start_rm(root, "len", backend="length", max_request_items=args.flood_pairs)
            procs.append(svc)
            print(
                f"3. RM flood: {args.flood} concurrent {args.flood_pairs}-pair compares to "
                "an RM service (length backend, default max_in_flight 64, max_queued_items "
                "4096)"
            )
            with Sampler(svc.popen.pid) as s:
                got = asyncio.run(flood(svc.url, args.flood, args.flood_pairs))
                time.sleep(1.0)
            print(f"   answers: {dict(got)}")
            print(f"   RM RSS start {mib(s.rss[0])}, peak {mib(max(s.rss))}, end {mib(s.rss[-1])}")
        finally:
            for p in procs:
                p.kill()


if __name__ == "__main__":
    main()
