"""Redis connection pool under bursts: N route requests at a time through a real gateway on Redis.

Started here, on loopback: a private redis-server (AOF, ``appendfsync always``), a ``length`` RM
service, one gateway replica (uvicorn, ``python -m gateway serve``) on that Redis with a tiny
router, its ``max_in_flight`` above the burst so that only the store can refuse. A closed-loop
driver keeps ``--in-flight`` ``/v1/route`` requests open at once (one pair each, ``--requests``
in all), and after each answer sends ``/v1/feedback`` for its route id. Printed per burst size:
answers by status and error code (target: all 200), route p50/p99, and the most connections
Redis saw from the gateway (``connected_clients``, sampled every 50 ms).

``--code-root`` runs the gateway from another checkout (e.g. one from before the blocking pool,
to see the old ``503 store_unavailable: Too many connections``).

    .venv/bin/python benchmarks/bench_redis_pool.py --in-flight 200,400 --requests 4000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aredis
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import pct  # noqa: E402
from tests.gateway.helpers import build_router, gateway_config, start_rm  # noqa: E402
from tests.procs import Proc, free_port, start_process, start_redis  # noqa: E402


def pair(i: int) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
        "response_a": f"{2 * i}",
        "response_b": f"It is {2 * i + 1}, I think.",
    }


async def watch_clients(url: str, stop: asyncio.Event, seen: list[int]) -> None:
    client = aredis.Redis.from_url(url)
    try:
        while not stop.is_set():
            info = await client.info("clients")
            seen.append(int(info["connected_clients"]) - 1)  # less this watcher
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def burst(gw: str, redis_url: str, in_flight: int, requests: int) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    lat: list[float] = []
    queue = iter(range(requests))
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    stop = asyncio.Event()
    seen: list[int] = []
    watcher = asyncio.create_task(watch_clients(redis_url, stop, seen))

    def kind(r: httpx.Response) -> str:
        if r.status_code == 200:
            return "200"
        try:
            err = r.json().get("error", {})
            return f"{r.status_code} {err.get('type')}: {str(err.get('message'))[:80]}"
        except ValueError:
            return f"{r.status_code}"

    async with httpx.AsyncClient(base_url=gw, limits=limits, timeout=120) as client:

        async def worker() -> None:
            for i in queue:
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        "/v1/route", json={"namespace": "bench", "pairs": [pair(i)]}
                    )
                except httpx.TransportError as exc:
                    statuses[f"route {type(exc).__name__}"] += 1
                    continue
                lat.append((time.perf_counter() - t0) * 1000)
                statuses[f"route {kind(r)}"] += 1
                if r.status_code != 200:
                    continue
                rid = r.json()["results"][0]["route_id"]
                try:
                    f = await client.post(
                        "/v1/feedback", json={"feedback": [{"route_id": rid, "reward": -0.5}]}
                    )
                    statuses[f"feedback {kind(f)}"] += 1
                except httpx.TransportError as exc:
                    statuses[f"feedback {type(exc).__name__}"] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        wall = time.perf_counter() - t0
    stop.set()
    await watcher
    return {"statuses": statuses, "lat": lat, "wall": wall, "max_clients": max(seen or [0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in-flight", default="200,400", help="burst sizes, comma-separated")
    ap.add_argument("--requests", type=int, default=4000, help="route requests per burst size")
    ap.add_argument("--pool-size", type=int, default=None, help="redis_pool_size (default: its)")
    ap.add_argument(
        "--no-router", action="store_true", help="route on the intercept alone (no encoder)"
    )
    ap.add_argument(
        "--url-query",
        default="",
        help="appended to the gateway's REDIS_URL, e.g. 'max_connections=16' (redis-py reads it; "
        "the same pool size for a checkout without redis_pool_size)",
    )
    ap.add_argument("--code-root", type=Path, default=ROOT, help="checkout the gateway runs from")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="rr-bench-pool-"))
    procs: list[Proc] = []
    try:
        rdir = root / "redis"
        rdir.mkdir()
        redis_proc = start_redis(free_port(), rdir)
        procs.append(redis_proc)
        redis_url = f"redis://127.0.0.1:{redis_proc.port}/0"
        rm = start_rm(root, "len", backend="length", max_in_flight=4096)
        procs.append(rm)
        extra: dict[str, Any] = {"max_in_flight": 4096, "log_level": "warning"}
        if args.pool_size is not None:
            extra["redis_pool_size"] = args.pool_size
        cfg = gateway_config(
            root,
            {"len": rm.url},
            router=None if args.no_router else build_router(root, ["len"]),
            redis_url=f"{redis_url}?{args.url_query}" if args.url_query else redis_url,
            policy={"name": "bayesian-no-offline" if args.no_router else "bayesian"},
            **extra,
        )
        # ``python -m`` imports from its working directory first: run it in the checkout.
        code = args.code_root.resolve()
        port = int(yaml.safe_load(cfg.read_text())["port"])
        gw = start_process(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
            port,
            env={"PYTHONPATH": str(code)},
            ready_url=f"http://127.0.0.1:{port}/readyz",
            timeout=120,
            cwd=code,
        )
        procs.append(gw)
        httpx.post(f"{gw.url}/v1/namespaces/bench", timeout=60).raise_for_status()
        print(
            f"# gateway from {code}, "
            f"{'no router' if args.no_router else 'tiny router'}, redis_pool_size "
            f"{args.pool_size or 'default'}, url query {args.url_query!r}, {args.requests} "
            f"one-pair routes (+ feedback) per burst size, load average {os.getloadavg()[0]:.1f}"
        )
        for n in (int(x) for x in args.in_flight.split(",")):
            asyncio.run(burst(gw.url, redis_url, min(n, 50), 200))  # warm-up
            res = asyncio.run(burst(gw.url, redis_url, n, args.requests))
            st: Counter[str] = res["statuses"]
            routes = sum(v for k, v in st.items() if k.startswith("route"))
            bad = sum(v for k, v in st.items() if not k.endswith(" 200"))
            print(
                f"in flight {n}: {routes} routes in {res['wall']:.1f} s, errors {bad} "
                f"({100 * bad / max(routes, 1):.1f}% of routes), route p50 "
                f"{pct(res['lat'], 50):.0f} ms p99 {pct(res['lat'], 99):.0f} ms, most redis "
                f"connections {res['max_clients']}"
            )
            for k, v in sorted(st.items()):
                print(f"    {v:>6}  {k}")
    finally:
        for p in reversed(procs):
            p.kill(signal.SIGTERM)
            p.log.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
