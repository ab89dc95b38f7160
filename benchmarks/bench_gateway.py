"""Gateway cost, side by side in one run: the same one-pair requests sent to a ``length`` RM
service directly and through the gateway (which encodes the pair, draws from the posterior, asks
that same RM and writes the route record), at the same concurrency, for each encoder backend
(torch, and ONNX Runtime with int8 weights when onnxruntime is installed) and store.

Every figure is also printed as a ratio of two things measured in this run:

* the encoder alone (this process, one thread, batches of 32): CPU per pair per backend, and
  torch / onnx-int8 (target: 3x less CPU);
* pairs/s through the gateway vs the RM called directly and vs the encoder alone: the slowest
  stage alone bounds the pipeline (target: >= 0.8x of it at 200 in flight);
* the gateway's CPU per pair, split by thread (/proc): the event loop (HTTP, validation,
  routing, RM client, store, metrics; target <= 1.5 ms excluding encoding) and the encoder's
  threads;
* the gateway's overhead per request excluding encoding and the RM wait, from its own timing
  (``x-reward-router-overhead-ms`` minus ``x-reward-router-encode-ms``; target p99 <= 5 ms at
  400 in flight, 0 errors), and how much of it was the wait for the store
  (``x-reward-router-store-ms``: the state read and route-record writes; with Redis under
  ``appendfsync always``, a disk fsync per write);
* with the Redis store, the Redis traffic per request, from the server's own ``INFO``
  (commands per request by name, and connections opened): what is per request and what is
  shared by concurrent requests (route records written in one pipeline per loop turn).

The driver is one lean keep-alive connection per request in flight
(:class:`benchmarks.common.RawHTTP`, ~0.1 ms of CPU per request; httpx's pool cost ~8 ms at
200 connections and was the "direct" baseline's limit). Both servers are started with
``max_in_flight`` = 2 x the highest concurrency, so no request is refused by design.

Run: ``.venv/bin/python benchmarks/bench_gateway.py`` (``--encoder minilm`` for the real encoder,
``--pairs``, ``--concurrency 200,400``, ``--backends torch,onnx-int8``, ``--stores
embedded,redis``). Needs redis-server for the Redis run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

OVERHEAD = "x-reward-router-overhead-ms"
ENCODE = "x-reward-router-encode-ms"
STORE = "x-reward-router-store-ms"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RawHTTP, cpu_seconds, pct, thread_cpu_seconds  # noqa: E402
from reward_router.heap import freeze_startup_heap  # noqa: E402
from tests.procs import Proc, free_port, start_process, start_redis  # noqa: E402


def load_bench_pairs(n: int) -> list[dict[str, Any]]:
    from reward_router.data import load_pairs

    src = load_pairs(ROOT / "data/pairs/hh-rlhf.jsonl.gz")
    out = []
    for i in range(n):
        p = src[i % len(src)]
        out.append(
            {
                "id": f"b{i}",
                "prompt": [dict(m) for m in p.prompt],
                "response_a": p.chosen,
                "response_b": p.rejected,
            }
        )
    return out


def build_router(root: Path, encoder: str) -> tuple[Path, Any]:
    """A router artifact over the chosen encoder (trained briefly on random data: the bench
    measures cost, not routing quality) and the router, for the separate encode timing."""
    from gateway.features import load_encoder
    from gateway.offline.model import RouterConfig
    from gateway.offline.train import train_router

    if encoder == "tiny":
        from tests.tiny_models import tiny_bert

        ref = str(tiny_bert(root / "tiny-encoder", hidden=32))
    else:
        ref = encoder
    enc = load_encoder(ref, max_length=256, progress=False)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(128, 2 * enc.dim)).astype(np.float32)
    correct = rng.integers(0, 2, size=(128, 1)).astype(np.float64)
    cfg = RouterConfig(hidden_sizes=(256,), dim=64, epochs=2, patience=0)
    router, _ = train_router(
        feats, correct, ["len"], cfg, valid_fraction=0.0, encoder_ref=ref, max_length=256
    )
    out = root / "router"
    router.save(out)
    return out, router


async def load(
    url: str, path: str, bodies: list[dict[str, Any]], concurrency: int
) -> dict[str, Any]:
    """Send every body (one pair each) with ``concurrency`` requests in flight: one lean
    keep-alive connection per worker (:class:`benchmarks.common.RawHTTP`), so the driver's own
    CPU stays small next to the servers'."""
    lat: list[float] = []
    overhead: list[float] = []
    encode: list[float] = []
    store: list[float] = []
    errors: list[str] = []
    port = int(url.rsplit(":", 1)[1])
    payloads = iter([json.dumps(b).encode() for b in bodies])

    async def worker() -> None:
        conn = RawHTTP("127.0.0.1", port)
        try:
            for body in payloads:
                t0 = time.perf_counter()
                try:
                    status, headers, data = await conn.post(path, body)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                    errors.append(type(exc).__name__)
                    await conn.close()
                    continue
                if status != 200:
                    errors.append(f"HTTP {status}")
                    if len(errors) == 1:
                        print(f"  {path}: {status} {data[:300]!r}")
                    continue
                lat.append((time.perf_counter() - t0) * 1000)
                if OVERHEAD in headers:
                    e = float(headers[ENCODE])
                    overhead.append(float(headers[OVERHEAD]) - e)
                    encode.append(e)
                    store.append(float(headers[STORE]))
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    if errors:
        print(f"  {path}: {len(errors)} errors ({sorted(set(errors))})")
    return {
        "pairs_s": len(lat) / wall,
        "lat": lat,
        "overhead": overhead,
        "encode": encode,
        "store": store,
        "errors": len(errors),
    }


def start_rm(root: Path, in_flight: int) -> Proc:
    port = free_port()
    cfg = root / "rm.yaml"
    rm = {"name": "len", "backend": "length", "port": port, "max_in_flight": in_flight}
    cfg.write_text(yaml.safe_dump(rm))
    args = [sys.executable, "-m", "services", "serve", "--config", str(cfg)]
    return start_process(
        [*args, "--log-level", "warning"], port, ready_url=f"http://127.0.0.1:{port}/readyz"
    )


def start_gateway(
    root: Path, rm_url: str, router: Path, redis_url: str | None, backend: str, in_flight: int
) -> Proc:
    port = free_port()
    cfg: dict[str, Any] = {
        "port": port,
        "rms": [{"name": "len", "url": rm_url}],
        "router_path": str(router),
        "max_in_flight": in_flight,
        "seed": 0,
        "policy": {"name": "bayesian"},
    }
    if backend != "torch":  # set only when needed: the torch default runs older gateways too
        cfg["encoder_backend"] = backend
    if redis_url:
        cfg["redis_url"] = redis_url
    path = root / f"gw-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
    return start_process(args, port, ready_url=f"http://127.0.0.1:{port}/readyz", timeout=180)


def row(name: str, res: dict[str, Any]) -> str:
    lat = res["lat"]
    return (
        f"{name:<40} {res['pairs_s']:>8.0f} {pct(lat, 50):>8.1f} {pct(lat, 99):>8.1f} "
        f"{res['errors']:>6}"
    )


def encode_alone(featurizer: Any, pairs: list[dict[str, Any]]) -> tuple[float, float]:
    """(wall ms, CPU ms) per pair of ``featurizer`` in this process, one thread, batches of
    32 (the encoder stage alone, while the servers idle)."""

    def run(chunk: list[dict[str, Any]]) -> None:
        featurizer.featurize(
            [p["prompt"] for p in chunk],
            [p["response_a"] for p in chunk],
            [p["response_b"] for p in chunk],
        )

    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(pairs), 32):
        run(pairs[i : i + 32])
    n = len(pairs)
    return (time.perf_counter() - t0) * 1000 / n, (time.process_time() - c0) * 1000 / n


def backends_available(wanted: list[str]) -> list[str]:
    out = []
    for b in wanted:
        if b == "onnx-int8" and importlib.util.find_spec("onnxruntime") is None:
            print("onnx-int8: skipped (no onnxruntime: pip install 'reward-router[onnx]')")
            continue
        out.append(b)
    return out


def redis_counts(url: str | None) -> dict[str, int]:
    """Commands the server ran, by name, and ``connections`` it accepted (INFO itself left out)."""
    if url is None:
        return {}
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
        out = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        out["connections"] = int(client.info("stats")["total_connections_received"])
    finally:
        client.close()
    out.pop("info", None)
    return out


def run_gateway(
    gw: Proc,
    rm: Proc,
    store: str,
    bench_pairs: list[dict[str, Any]],
    conc: int,
    featurizer: Any,
    sample: list[dict[str, Any]],
    redis_url: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """Each stage alone, then the pipeline, back to back at ``conc`` in flight: the RM direct,
    the encoder alone (this process), then through the gateway; results, CPU per pair and the
    Redis commands per request (``redis.<command>``)."""
    n = len(bench_pairs)
    direct_bodies = [{"pairs": [{k: v for k, v in p.items() if k != "id"}]} for p in bench_pairs]
    gw_bodies = [{"namespace": f"bench-{store}", "pairs": [p]} for p in bench_pairs]
    c0 = cpu_seconds(rm.popen.pid)
    direct = asyncio.run(load(rm.url, "/v1/compare", direct_bodies, conc))
    cpu = {"rm_direct": (cpu_seconds(rm.popen.pid) - c0) * 1000 / n}
    enc_wall, cpu["encoder_alone"] = encode_alone(featurizer, sample)
    cpu["encoder_rate"] = 1000 / enc_wall
    r0, t0 = cpu_seconds(rm.popen.pid), thread_cpu_seconds(gw.popen.pid)
    before = redis_counts(redis_url)
    via = asyncio.run(load(gw.url, "/v1/route", gw_bodies, conc))
    t1 = thread_cpu_seconds(gw.popen.pid)
    after = redis_counts(redis_url)
    for name, calls in after.items():
        if calls > before.get(name, 0):
            cpu[f"redis.{name}"] = (calls - before.get(name, 0)) / n
    cpu["rm_via"] = (cpu_seconds(rm.popen.pid) - r0) * 1000 / n
    spent = {tid: v - t0.get(tid, 0.0) for tid, v in t1.items()}
    cpu["loop"] = spent.pop(gw.popen.pid, 0.0) * 1000 / n
    cpu["encoder"] = sum(spent.values()) * 1000 / n
    return direct, via, cpu


def report(
    tag: str, direct: dict[str, Any], via: dict[str, Any], cpu: dict[str, float]
) -> dict[str, float]:
    enc_rate = cpu["encoder_rate"]
    print(row(f"{tag} RM direct", direct))
    print(row(f"{tag} through gateway", via))
    ov = via["overhead"]
    slowest = min(direct["pairs_s"], enc_rate)
    print(
        f"{tag}   through gateway / RM direct {via['pairs_s'] / direct['pairs_s']:.2f}x, / "
        f"encoder alone ({enc_rate:.0f}/s) {via['pairs_s'] / enc_rate:.2f}x, / slowest stage "
        f"{via['pairs_s'] / slowest:.2f}x (target >= 0.8)"
    )
    print(
        f"{tag}   gateway CPU/pair: event loop {cpu['loop']:.2f} ms (excl. encoding; target "
        f"<= 1.5), encoder threads {cpu['encoder']:.2f} ms (alone {cpu['encoder_alone']:.2f} "
        f"ms); RM CPU/pair direct "
        f"{cpu['rm_direct']:.2f} ms, via the gateway {cpu['rm_via']:.2f} ms (merged calls)"
    )
    print(
        f"{tag}   overhead excl. encoding and RM wait: p50 {pct(ov, 50):.2f} ms, "
        f"p99 {pct(ov, 99):.2f} ms (target p99 <= 5 at 400 in flight); encode wait per request "
        f"p50 {pct(via['encode'], 50):.1f} ms; errors {via['errors']}"
    )
    store = via["store"]
    if store:
        own = [o - w for o, w in zip(ov, store, strict=True)]
        print(
            f"{tag}   of the overhead, the store wait (state read, route-record writes): p50 "
            f"{pct(store, 50):.2f} ms, p99 {pct(store, 99):.2f} ms; the rest, the gateway's own "
            f"work: p50 {pct(own, 50):.2f} ms, p99 {pct(own, 99):.2f} ms"
        )
    per_request = {k.removeprefix("redis."): v for k, v in cpu.items() if k.startswith("redis.")}
    if per_request:
        print(
            f"{tag}   redis per request: "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(per_request.items()))
        )
    return {
        "ratio_slowest": via["pairs_s"] / slowest,
        "loop_ms": cpu["loop"],
        "p99": pct(ov, 99),
        "errors": via["errors"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--concurrency", default="200,400", help="comma-separated, e.g. 200,400")
    ap.add_argument("--encoder", default="tiny", help="'tiny' (random tiny BERT) or 'minilm'")
    ap.add_argument("--backends", default="torch,onnx-int8")
    ap.add_argument("--stores", default="embedded,redis")
    ap.add_argument(
        "--encode-sample", type=int, default=256, help="pairs of each encoder-alone run"
    )
    args = ap.parse_args()
    concs = [int(c) for c in args.concurrency.split(",")]
    in_flight = 2 * max(concs)

    root = Path(tempfile.mkdtemp(prefix="rr-bench-gw-"))
    procs: list[Proc] = []
    try:
        import torch

        torch.set_num_threads(1)
        bench_pairs = load_bench_pairs(args.pairs)
        router_dir, router = build_router(root, args.encoder)
        backends = backends_available(args.backends.split(","))
        # The encoder alone: a sample of the pairs, warmed up first (an ONNX session's first
        # runs allocate), repeated next to every gateway run below.
        sample = bench_pairs[: min(args.encode_sample, len(bench_pairs))]
        featurizers = {b: router.load_featurizer(backend=b, threads=1) for b in backends}
        # The driver's own full collections walked torch's heap (0.1-0.3 s each, measured): they
        # paused the load it generates and the encoder-alone runs. Frozen, as the services do.
        freeze_startup_heap()
        alone = {}
        for b, fz in featurizers.items():
            encode_alone(fz, sample[:32])
            alone[b] = encode_alone(fz, sample)
        print(
            f"# {args.pairs} one-pair requests at {concs} in flight, encoder {args.encoder}, "
            f"length RM; load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
        )
        for b, (wall, cpu_ms) in alone.items():
            print(f"encoder alone [{b}] (batch 32, 1 thread): {wall:.2f} ms/pair wall, "
                  f"{cpu_ms:.2f} ms/pair CPU")  # fmt: skip
        if "torch" in alone and "onnx-int8" in alone:
            print(
                f"encoder CPU/pair torch / onnx-int8: "
                f"{alone['torch'][1] / alone['onnx-int8'][1]:.2f}x (target >= 3)"
            )
        rm = start_rm(root, in_flight)
        procs.append(rm)
        print(f"{'path':<40} {'pairs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for store in args.stores.split(","):
            redis_url = None
            redis = None
            if store == "redis":
                if shutil.which("redis-server") is None:
                    print("redis: skipped (no redis-server)")
                    continue
                rdir = root / "redis"
                rdir.mkdir(exist_ok=True)
                redis = start_redis(free_port(), rdir)
                procs.append(redis)
                redis_url = f"redis://127.0.0.1:{redis.port}/0"
            for backend in backends:
                gw = start_gateway(root, rm.url, router_dir, redis_url, backend, in_flight)
                procs.append(gw)
                ns = f"{gw.url}/v1/namespaces/bench-{store}"
                httpx.post(ns, timeout=60).raise_for_status()
                fz = featurizers[backend]
                run_gateway(gw, rm, store, bench_pairs[:200], min(concs), fz, sample[:32])
                for conc in concs:
                    direct, via, cpu = run_gateway(
                        gw, rm, store, bench_pairs, conc, fz, sample, redis_url
                    )
                    report(f"[{store} {backend} {conc}]", direct, via, cpu)
                gw.kill(signal.SIGTERM)
            if redis is not None:
                redis.kill()
        print(
            f"# load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
        )
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
