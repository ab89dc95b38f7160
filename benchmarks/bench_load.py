"""Bounded load test: two gateway replicas sharing one Redis, a fixed arrival rate for a fixed time.

Everything runs on loopback and is started here: a private redis-server on a free port, two RM
services that need no model (``length`` and ``verifier``), two gateway replicas with a tiny
router (tiny random BERT encoder), both on that Redis. An open-loop asyncio driver sends
``/v1/route`` requests on a fixed schedule (``--rate`` per second, alternating replicas),
whether or not earlier ones have answered, and follows each answer with ``/v1/feedback`` for
its route ids (half of them to the other replica), so the log grows and every route record is
used. It stops by itself: after ``--duration`` seconds no more requests are scheduled, and
whatever has not answered ``--drain-s`` seconds later is cancelled and counted as an error.

Latency of a route is measured from its *scheduled* send time (so a driver or a server that
falls behind shows up in the figures instead of silently lowering the rate: no coordinated
omission); service time is from the actual send. Printed: requests sent and answered, errors by
kind (target zero), route p50/p90/p99/max and feedback p50/p99, the achieved rate, RSS of each
process (2 gateways, 2 RMs, Redis) at the start, the end and the most seen (sampled every
second), Redis key counts and ``used_memory`` every 10 s, and the load average.

Route records expire after ``route_ttl_s`` (docs/gateway.md): with ``--route-ttl-s 10`` the
number of route keys in Redis stops growing at about rate x pairs x TTL, and after the run the
script waits for them to expire and shows the count going back to zero.

Run: ``.venv/bin/python benchmarks/bench_load.py --json load.json`` (``--rate``, ``--duration``,
``--pairs-per-request``, ``--route-ttl-s``, ``--no-router``). Needs redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis.asyncio as aredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_seconds, pct  # noqa: E402
from tests.gateway.helpers import build_router, gateway_config, start_gateway, start_rm  # noqa: E402
from tests.procs import Proc, free_port, start_redis  # noqa: E402

RMS = ("len", "math")
KEY_PREFIX = "rr"  # the gateway's default key_prefix


# ---- the system under test -----------------------------------------------------------------------


@dataclass
class Cluster:
    """The started processes: Redis, the two RM services, the two gateway replicas."""

    redis: Proc
    rms: list[Proc]
    gateways: list[Proc]

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def pids(self) -> dict[str, int]:
        named = {f"gateway-{i}": g for i, g in enumerate(self.gateways)}
        named |= {f"rm-{name}": p for name, p in zip(RMS, self.rms, strict=True)}
        named["redis"] = self.redis
        return {name: p.popen.pid for name, p in named.items()}


def _start_all(starters: list[Callable[[], Proc]], procs: list[Proc]) -> list[Proc]:
    """Run the starters in threads (each waits for its process to be ready, mostly idle),
    append every process that started to ``procs`` (so it is stopped), raise the first error."""
    with ThreadPoolExecutor(len(starters)) as pool:
        futures = [pool.submit(f) for f in starters]
    started, errors = [], []
    for fut in futures:
        exc = fut.exception()
        if exc is None:
            started.append(fut.result())
        else:
            errors.append(exc)
    procs.extend(started)
    if errors:
        raise errors[0]
    return started


@contextmanager
def cluster(
    root: Path, *, route_ttl_s: float, router: bool = True, keep_logs: Path | None = None
) -> Iterator[Cluster]:
    """Start Redis, a ``length`` and a ``verifier`` RM service and two gateway replicas on that
    Redis (``route_ttl_s`` for their route records); stop them all on the way out (copying
    their logs into ``keep_logs`` if given)."""
    procs: list[Proc] = []
    try:
        rdir = root / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        redis_proc, rm_len, rm_math = _start_all(
            [
                lambda: start_redis(free_port(), rdir),
                lambda: start_rm(root, "len", backend="length"),
                lambda: start_rm(root, "math", backend="verifier"),
            ],
            procs,
        )
        router_path = build_router(root, RMS) if router else None
        configs = [
            gateway_config(
                root,
                {"len": rm_len.url, "math": rm_math.url},
                router=router_path,
                redis_url=f"redis://127.0.0.1:{redis_proc.port}/0",
                route_ttl_s=route_ttl_s,
                # Without a router there are no offline prior means for `bayesian`.
                policy={"name": "bayesian" if router else "bayesian-no-offline"},
                health_interval_s=2.0,  # the default; the test helpers' 0.5 s is for fast tests
                log_level="warning",
            )
            for _ in range(2)
        ]
        gateways = _start_all([partial(start_gateway, c) for c in configs], procs)
        yield Cluster(redis=redis_proc, rms=[rm_len, rm_math], gateways=gateways)
    finally:
        for p in reversed(procs):
            try:
                p.kill(signal.SIGTERM)
            except Exception:
                p.kill()
            if keep_logs is not None and p.log.exists():
                keep_logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(p.log, keep_logs / f"{Path(p.args[0]).name}-{p.port}.log")
            p.log.unlink(missing_ok=True)


# ---- the driver ----------------------------------------------------------------------------------


def make_pairs(i: int, k: int) -> list[dict[str, Any]]:
    """``k`` distinct small math pairs for request ``i`` (with a reference, so the verifier
    scores them instead of abstaining); which side is right alternates."""
    out = []
    for j in range(k):
        n = i * k + j
        a, b = n % 97, (n * 7) % 89
        right, wrong = f"{a} + {b} = {a + b}\n#### {a + b}", f"I think it is {a + b + 1}."
        ra, rb = (right, wrong) if n % 2 == 0 else (wrong, right)
        out.append(
            {
                "id": f"q{n}",
                "prompt": f"What is {a} + {b}? (question {n})",
                "response_a": ra,
                "response_b": rb,
                "reference": str(a + b),
            }
        )
    return out


def reward_for(n: int) -> float:
    """A deterministic raw reward (a -DPO-loss-like value around -0.69) for pair number ``n``."""
    return -0.69 + ((n * 37) % 101 - 50) / 250.0


@dataclass
class LoadConfig:
    """What the open-loop driver sends."""

    rate: float = 20.0  # route requests per second (arrivals, whatever the answers do)
    duration_s: float = 60.0
    pairs_per_request: int = 2
    drain_s: float = 30.0  # after the last scheduled send; then the rest is cancelled
    request_timeout_s: float = 30.0
    # Past this many requests in flight a scheduled request is not sent but counted as an
    # error: an overloaded system shows up as errors instead of the driver itself choking on
    # thousands of open connections (and minutes-long latencies that measure only the backlog).
    max_inflight: int = 256
    namespace: str = "load"

    @property
    def requests(self) -> int:
        return round(self.rate * self.duration_s)


@dataclass
class LoadResult:
    """What came back; latencies in ms."""

    sent: int = 0
    answered: int = 0  # /v1/route answered 200
    feedback_answered: int = 0  # /v1/feedback answered 200
    routes: int = 0  # route ids received
    applied: int = 0
    duplicate: int = 0
    unknown: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_error: dict[str, str] = field(default_factory=dict)
    route_ms: list[float] = field(default_factory=list)  # from the scheduled send time
    route_service_ms: list[float] = field(default_factory=list)  # from the actual send
    overhead_ms: list[float] = field(default_factory=list)  # the gateway's own header
    feedback_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)  # actual minus scheduled send
    send_window_s: float = 0.0  # first to last send
    peak_inflight: int = 0
    wall_s: float = 0.0  # first send to last answer (or drain timeout)

    def error(self, kind: str, detail: str = "") -> None:
        self.errors[kind] += 1
        self.first_error.setdefault(kind, detail[:300])


async def drive(
    urls: list[str], cfg: LoadConfig, *, on_start: Callable[[], None] | None = None
) -> LoadResult:
    """Send ``cfg.requests`` route requests at ``cfg.rate``/s to ``urls`` in turn (open loop),
    each followed by its feedback; return once all answered or ``cfg.drain_s`` after the last
    send, whichever is first."""
    res = LoadResult()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=5.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        # A route never creates its namespace; this is idempotent (200 again, or 409 when it
        # exists with another config, used as it is).
        made = await client.post(f"{urls[0]}/v1/namespaces/{cfg.namespace}")
        if made.status_code not in (200, 409):
            raise RuntimeError(f"creating namespace {cfg.namespace}: {made.text}")

        async def one(i: int, scheduled: float) -> None:
            url = urls[i % len(urls)]
            fb_url = urls[(i // 2) % len(urls)]  # half of the feedback goes to the other replica
            body = {"namespace": cfg.namespace, "pairs": make_pairs(i, cfg.pairs_per_request)}
            sent = time.perf_counter()
            res.send_lag_ms.append((sent - scheduled) * 1000)
            try:
                r = await client.post(f"{url}/v1/route", json=body)
            except httpx.TimeoutException as exc:
                res.error("route: timeout", repr(exc))
                return
            except httpx.TransportError as exc:
                res.error(f"route: {type(exc).__name__}", repr(exc))
                return
            done = time.perf_counter()
            if r.status_code != 200:
                res.error(f"route: HTTP {r.status_code}", r.text)
                return
            res.answered += 1
            res.route_ms.append((done - scheduled) * 1000)
            res.route_service_ms.append((done - sent) * 1000)
            if "x-reward-router-overhead-ms" in r.headers:
                res.overhead_ms.append(float(r.headers["x-reward-router-overhead-ms"]))
            ids = [x["route_id"] for x in r.json()["results"]]
            res.routes += len(ids)
            if len(ids) != cfg.pairs_per_request:
                res.error("route: wrong number of results", f"{len(ids)} results")
            n0 = i * cfg.pairs_per_request
            fb = {
                "feedback": [
                    {"route_id": rid, "reward": reward_for(n0 + j)} for j, rid in enumerate(ids)
                ]
            }
            t0 = time.perf_counter()
            fr: httpx.Response | None = None
            # Feedback is exactly-once per route id, so like the trainer client we send it again
            # after a transport error (once); the error still counts, and the second answer
            # tells whether the first attempt had been applied ("duplicate") or not.
            for attempt in range(2):
                try:
                    fr = await client.post(f"{fb_url}/v1/feedback", json=fb)
                    break
                except httpx.TransportError as exc:
                    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else None
                    res.error(f"feedback: {kind or type(exc).__name__}", repr(exc))
                    if attempt == 1:
                        return
            assert fr is not None
            if fr.status_code != 200:
                res.error(f"feedback: HTTP {fr.status_code}", fr.text)
                return
            res.feedback_ms.append((time.perf_counter() - t0) * 1000)
            res.feedback_answered += 1
            out = fr.json()
            res.applied += out["applied"]
            res.duplicate += out["duplicate"]
            res.unknown += out["unknown"]
            if out["applied"] != len(ids):
                res.error("feedback: not applied", json.dumps(out))

        async def guarded(i: int, scheduled: float) -> None:
            try:
                await one(i, scheduled)
            except Exception as exc:  # a malformed answer: counted, never lost with its task
                res.error(f"unexpected: {type(exc).__name__}", repr(exc))

        tasks: set[asyncio.Task[None]] = set()
        if on_start is not None:
            on_start()
        start = time.perf_counter()
        for i in range(cfg.requests):
            scheduled = start + i / cfg.rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks = {t for t in tasks if not t.done()}
            if len(tasks) >= cfg.max_inflight:
                res.error("not sent: max in flight", f"{len(tasks)} requests in flight")
                continue
            tasks.add(asyncio.create_task(guarded(i, scheduled)))
            res.peak_inflight = max(res.peak_inflight, len(tasks))
            res.sent += 1
        res.send_window_s = time.perf_counter() - start
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=cfg.drain_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                res.errors["unanswered at drain timeout"] += len(pending)
        res.wall_s = time.perf_counter() - start
    return res


# ---- what the processes and Redis hold -----------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (0 once it is gone)."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
        return sum(q.memory_info().rss for q in procs)
    except psutil.Error:
        return 0


async def redis_stats(client: aredis.Redis, prefix: str = KEY_PREFIX) -> dict[str, int]:
    """Key counts (all, route records), log entries and ``used_memory`` of the store."""
    routes = 0
    async for _ in client.scan_iter(match=f"{prefix}:ns:*:g:*:r:*", count=1000):
        routes += 1
    log_entries = 0
    async for key in client.scan_iter(match=f"{prefix}:ns:*:g:*:log", count=1000):
        log_entries += int(await client.llen(key))
    mem = await client.info("memory")
    return {
        "keys": int(await client.dbsize()),
        "route_keys": routes,
        "log_entries": log_entries,
        "used_memory": int(mem["used_memory"]),
    }


@dataclass
class Monitor:
    """Samples RSS of every process each second (keeping the most seen) and Redis every
    ``redis_every_s`` seconds into a timeline."""

    pids: dict[str, int]
    redis_url: str
    redis_every_s: float = 10.0
    rss_max: dict[str, int] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    t0: float = 0.0

    def rss(self) -> dict[str, int]:
        now = {name: rss_bytes(pid) for name, pid in self.pids.items()}
        for name, v in now.items():
            self.rss_max[name] = max(self.rss_max.get(name, 0), v)
        return now

    async def point(self, client: aredis.Redis, label: str | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {"t_s": round(time.perf_counter() - self.t0, 1)}
        if label:
            row["label"] = label
        row |= await redis_stats(client)
        row["rss"] = self.rss()
        row["cpu_s"] = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        row["cpu_s"]["driver"] = time.process_time()
        self.timeline.append(row)
        return row

    async def run(self, stop: asyncio.Event, client: aredis.Redis, echo: bool) -> None:
        next_redis = self.t0 + self.redis_every_s
        while not stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            if stop.is_set():
                return
            self.rss()
            if time.perf_counter() >= next_redis:
                next_redis += self.redis_every_s
                row = await self.point(client)
                if echo:
                    print(timeline_line(row), flush=True)


def mib(b: int) -> str:
    return f"{b / 2**20:.1f}"


def timeline_line(row: dict[str, Any]) -> str:
    label = f" ({row['label']})" if "label" in row else ""
    gws = ", ".join(mib(v) for k, v in row["rss"].items() if k.startswith("gateway"))
    return (
        f"  t={row['t_s']:>6.1f}s{label}: route keys {row['route_keys']:>6}, all keys "
        f"{row['keys']:>6}, log entries {row['log_entries']:>6}, redis used_memory "
        f"{mib(row['used_memory'])} MiB, gateway RSS {gws} MiB"
    )


# ---- one run -------------------------------------------------------------------------------------


async def measure(
    c: Cluster, cfg: LoadConfig, *, route_ttl_s: float, expiry_wait_s: float, echo: bool = True
) -> dict[str, Any]:
    """Warm up, sample, drive, sample; then (short TTLs) wait for the route keys to expire."""
    # Warm-up, not counted: creates the namespace and loads lazy parts (the encoder's first
    # forward pass, connection pools) so "start" memory is a running replica's, not a cold one's.
    warm = LoadConfig(rate=10, duration_s=1.0, pairs_per_request=cfg.pairs_per_request)
    warm.namespace = cfg.namespace
    wres = await drive(c.urls, warm)
    if wres.errors:
        raise RuntimeError(f"warm-up failed: {dict(wres.errors)} {wres.first_error}")
    mon = Monitor(c.pids(), c.redis_url)
    client = aredis.Redis.from_url(c.redis_url)
    try:
        load_start = os.getloadavg()
        stop = asyncio.Event()
        mon.t0 = time.perf_counter()
        start = await mon.point(client, "start")
        if echo:
            print(timeline_line(start), flush=True)
        sampler = asyncio.create_task(mon.run(stop, client, echo))
        res = await drive(c.urls, cfg)
        stop.set()
        await sampler
        end = await mon.point(client, "end")
        load_end = os.getloadavg()
        if echo:
            print(timeline_line(end), flush=True)
        expired: dict[str, Any] | None = None
        if expiry_wait_s > 0:
            deadline = time.perf_counter() + expiry_wait_s
            while time.perf_counter() < deadline:
                await asyncio.sleep(1.0)
                if (await redis_stats(client))["route_keys"] == 0:
                    break
            expired = await mon.point(client, "after expiry")
            if echo:
                print(timeline_line(expired), flush=True)
    finally:
        await client.aclose()
    return {
        "config": {**asdict(cfg), "route_ttl_s": route_ttl_s},
        "result": res,
        "start": start,
        "end": end,
        "after_expiry": expired,
        "rss_max": dict(mon.rss_max),
        "timeline": mon.timeline,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
    }


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """The figures of a run, JSON-ready."""
    res: LoadResult = run["result"]
    cfg = run["config"]

    def q(xs: list[float]) -> dict[str, float]:
        return {
            "p50": round(pct(xs, 50), 2),
            "p90": round(pct(xs, 90), 2),
            "p99": round(pct(xs, 99), 2),
            "max": round(max(xs), 2) if xs else float("nan"),
        }

    names = list(run["start"]["rss"])
    span = max(run["end"]["t_s"] - run["start"]["t_s"], 1e-9)
    return {
        "config": cfg,
        "offered": cfg["rate"] * cfg["duration_s"],
        "sent": res.sent,
        "peak_inflight": res.peak_inflight,
        "answered": res.answered,
        "feedback_answered": res.feedback_answered,
        "routes": res.routes,
        "applied": res.applied,
        "duplicate": res.duplicate,
        "unknown": res.unknown,
        "errors": dict(res.errors),
        "first_error": res.first_error,
        "offered_rate": cfg["rate"],
        "achieved_rate": round(res.answered / res.wall_s, 2) if res.wall_s else 0.0,
        "send_rate": round(res.sent / res.send_window_s, 2) if res.send_window_s else 0.0,
        "route_ms": q(res.route_ms),
        "route_service_ms": q(res.route_service_ms),
        "gateway_overhead_ms": q(res.overhead_ms),
        "feedback_ms": q(res.feedback_ms),
        "send_lag_ms": q(res.send_lag_ms),
        "rss_mib": {
            n: {
                "start": round(run["start"]["rss"][n] / 2**20, 1),
                "end": round(run["end"]["rss"][n] / 2**20, 1),
                "max": round(run["rss_max"].get(n, 0) / 2**20, 1),
            }
            for n in names
        },
        "redis": {
            k: {"start": run["start"][k], "end": run["end"][k]}
            | ({"after_expiry": run["after_expiry"][k]} if run["after_expiry"] else {})
            for k in ("keys", "route_keys", "log_entries", "used_memory")
        },
        "cpu_cores": {
            n: round((run["end"]["cpu_s"][n] - run["start"]["cpu_s"][n]) / span, 3)
            for n in run["end"]["cpu_s"]
        },
        "timeline": [
            {k: v for k, v in row.items() if k not in ("rss", "cpu_s")}
            | {"rss_mib": {n: round(v / 2**20, 1) for n, v in row["rss"].items()}}
            for row in run["timeline"]
        ],
        "loadavg_start": [round(x, 2) for x in run["loadavg_start"]],
        "loadavg_end": [round(x, 2) for x in run["loadavg_end"]],
        "cpus": os.cpu_count(),
    }


def print_summary(s: dict[str, Any]) -> None:
    cfg = s["config"]
    print(
        f"\n# {s['offered']:.0f} route requests x {cfg['pairs_per_request']} pairs offered at "
        f"{cfg['rate']}/s for {cfg['duration_s']} s to 2 gateway replicas (one Redis, "
        f"route_ttl_s {cfg['route_ttl_s']}); load average {s['loadavg_start']} at the start, "
        f"{s['loadavg_end']} at the end, {s['cpus']} CPUs"
    )
    print(
        f"answered {s['answered']}/{s['sent']} routes, {s['feedback_answered']} feedback; "
        f"route ids {s['routes']}, feedback applied {s['applied']}, duplicate {s['duplicate']}, "
        f"unknown {s['unknown']}; achieved {s['achieved_rate']} req/s "
        f"(sends at {s['send_rate']}/s), at most {s['peak_inflight']} in flight"
    )
    print(f"errors: {s['errors'] or 'none'}")
    for kind, detail in s["first_error"].items():
        print(f"  first {kind}: {detail}")
    print(f"{'latency (ms)':<42} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for label, key in (
        ("route, from scheduled send", "route_ms"),
        ("route, service time (from actual send)", "route_service_ms"),
        ("route, gateway overhead (header)", "gateway_overhead_ms"),
        ("feedback, service time", "feedback_ms"),
        ("driver send lag", "send_lag_ms"),
    ):
        v = s[key]
        print(f"{label:<42} {v['p50']:>8.1f} {v['p90']:>8.1f} {v['p99']:>8.1f} {v['max']:>8.1f}")
    print(f"{'RSS (MiB)':<16} {'start':>8} {'end':>8} {'max':>8}  CPU (cores, mean)")
    for name, v in s["rss_mib"].items():
        cores = s["cpu_cores"][name]
        print(f"{name:<16} {v['start']:>8.1f} {v['end']:>8.1f} {v['max']:>8.1f}  {cores:>8.2f}")
    print(f"{'driver':<16} {'':>8} {'':>8} {'':>8}  {s['cpu_cores']['driver']:>8.2f}")
    cols = ["start", "end"] + (["after_expiry"] if "after_expiry" in s["redis"]["keys"] else [])
    print(f"{'redis':<16} " + " ".join(f"{c:>13}" for c in cols))
    for k, v in s["redis"].items():
        print(f"{k:<16} " + " ".join(f"{v[c]:>13}" for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=20.0, help="route requests per second")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--pairs-per-request", type=int, default=2)
    ap.add_argument("--drain-s", type=float, default=30.0)
    ap.add_argument("--max-inflight", type=int, default=256)
    ap.add_argument("--route-ttl-s", type=float, default=86400.0)
    ap.add_argument(
        "--expiry-wait-s",
        type=float,
        default=None,
        help="after the run, wait up to this long for route keys to expire "
        "(default: TTL + 15 s when the TTL is under 5 minutes, else 0)",
    )
    ap.add_argument("--no-router", action="store_true", help="route on the intercept alone")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep-logs", type=Path, default=None, help="copy the processes' logs here")
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is needed")
    cfg = LoadConfig(
        rate=args.rate,
        duration_s=args.duration,
        pairs_per_request=args.pairs_per_request,
        drain_s=args.drain_s,
        max_inflight=args.max_inflight,
    )
    wait = args.expiry_wait_s
    if wait is None:
        wait = args.route_ttl_s + 15.0 if args.route_ttl_s < 300 else 0.0
    root = Path(tempfile.mkdtemp(prefix="rr-bench-load-"))
    try:
        with cluster(
            root, route_ttl_s=args.route_ttl_s, router=not args.no_router, keep_logs=args.keep_logs
        ) as c:
            run = asyncio.run(measure(c, cfg, route_ttl_s=args.route_ttl_s, expiry_wait_s=wait))
        s = summary(run)
        s["command"] = " ".join(["benchmarks/bench_load.py", *sys.argv[1:]])
        print_summary(s)
        if args.json:
            args.json.write_text(json.dumps(s, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
