"""Gateway cost, side by side in one run: the same pairs sent to a ``length`` RM service directly
and through the gateway (which encodes the pair, draws from the posterior, asks that same RM and
writes the route record), at the same concurrency.

Printed per store backend (embedded, Redis):

* pairs/s and p50/p99 end-to-end latency, direct vs through the gateway;
* the gateway's overhead per pair excluding feature encoding, from the gateway's own timing
  (``x-reward-router-overhead-ms`` minus ``x-reward-router-encode-ms`` per one-pair request):
  target p50 <= 2 ms, p99 <= 10 ms at 200 concurrent pairs (LiteLLM publishes a 12 ms median
  proxy overhead);
* the encoding cost per pair, separately: in the gateway (queue + batched encode, per request)
  and measured alone in this process (batches of 32, one thread).

Run: ``.venv/bin/python benchmarks/bench_gateway.py`` (``--encoder minilm`` for the real encoder,
``--pairs``, ``--concurrency``, ``--stores embedded,redis``). Needs redis-server for the Redis run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_seconds, pct  # noqa: E402
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
    measures cost, not routing quality) and the encoder, for the separate encode timing."""
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
    return out, router.load_featurizer()


async def load(
    url: str, path: str, bodies: list[dict[str, Any]], concurrency: int
) -> dict[str, Any]:
    """Send every body (one pair each) with ``concurrency`` requests in flight."""
    lat: list[float] = []
    overhead: list[float] = []
    encode: list[float] = []
    errors: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(body: dict[str, Any]) -> None:
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=body)
                except httpx.TransportError as exc:
                    errors.append(f"{type(exc).__name__}")
                    return
                lat.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    raise RuntimeError(f"{path}: {r.status_code} {r.text[:300]}")
                if "x-reward-router-overhead-ms" in r.headers:
                    o = float(r.headers["x-reward-router-overhead-ms"])
                    e = float(r.headers["x-reward-router-encode-ms"])
                    overhead.append(o - e)
                    encode.append(e)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
    if errors:
        print(f"  {path}: {len(errors)} transport errors ({sorted(set(errors))})")
    return {"pairs_s": len(lat) / wall, "lat": lat, "overhead": overhead, "encode": encode}


def start_rm(root: Path) -> Proc:
    port = free_port()
    cfg = root / "rm.yaml"
    cfg.write_text(yaml.safe_dump({"name": "len", "backend": "length", "port": port}))
    args = [sys.executable, "-m", "services", "serve", "--config", str(cfg)]
    return start_process(
        [*args, "--log-level", "warning"], port, ready_url=f"http://127.0.0.1:{port}/readyz"
    )


def start_gateway(root: Path, rm_url: str, router: Path, redis_url: str | None) -> Proc:
    port = free_port()
    cfg: dict[str, Any] = {
        "port": port,
        "rms": [{"name": "len", "url": rm_url}],
        "router_path": str(router),
        "seed": 0,
        "policy": {"name": "bayesian"},
    }
    if redis_url:
        cfg["redis_url"] = redis_url
    path = root / f"gw-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
    return start_process(args, port, ready_url=f"http://127.0.0.1:{port}/readyz", timeout=180)


def row(name: str, res: dict[str, Any]) -> str:
    lat = res["lat"]
    return f"{name:<34} {res['pairs_s']:>9.0f} {pct(lat, 50):>9.2f} {pct(lat, 99):>9.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--encoder", default="tiny", help="'tiny' (random tiny BERT) or 'minilm'")
    ap.add_argument("--stores", default="embedded,redis")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="rr-bench-gw-"))
    procs: list[Proc] = []
    try:
        bench_pairs = load_bench_pairs(args.pairs)
        router, featurizer = build_router(root, args.encoder)
        # Encoding alone, in this process: what one pair's features cost, one thread.
        import torch

        torch.set_num_threads(1)
        sample = bench_pairs[: min(256, len(bench_pairs))]
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(sample), 32):
            chunk = sample[i : i + 32]
            featurizer.featurize(
                [p["prompt"] for p in chunk],
                [p["response_a"] for p in chunk],
                [p["response_b"] for p in chunk],
            )
        encode_alone = (time.perf_counter() - t0) * 1000 / len(sample)
        encode_cpu = (time.process_time() - c0) * 1000 / len(sample)

        rm = start_rm(root)
        procs.append(rm)
        direct_bodies = [
            {"pairs": [{k: v for k, v in p.items() if k != "id"}]} for p in bench_pairs
        ]
        print(
            f"# {args.pairs} one-pair requests, {args.concurrency} in flight, encoder "
            f"{args.encoder}, length RM; encoding alone (batch 32, 1 thread): "
            f"{encode_alone:.2f} ms/pair wall, {encode_cpu:.2f} ms/pair CPU"
        )
        print(f"{'path':<34} {'pairs/s':>9} {'p50 ms':>9} {'p99 ms':>9}")
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
            gw = start_gateway(root, rm.url, router, redis_url)
            procs.append(gw)
            httpx.post(f"{gw.url}/v1/namespaces/bench-{store}", timeout=60).raise_for_status()
            gw_bodies = [{"namespace": f"bench-{store}", "pairs": [p]} for p in bench_pairs]
            warm = min(200, len(bench_pairs))
            asyncio.run(load(rm.url, "/v1/compare", direct_bodies[:warm], args.concurrency))
            asyncio.run(load(gw.url, "/v1/route", gw_bodies[:warm], args.concurrency))
            c0 = cpu_seconds(rm.popen.pid)
            direct = asyncio.run(load(rm.url, "/v1/compare", direct_bodies, args.concurrency))
            rm_cpu = (cpu_seconds(rm.popen.pid) - c0) * 1000 / len(bench_pairs)
            g0 = cpu_seconds(gw.popen.pid)
            via = asyncio.run(load(gw.url, "/v1/route", gw_bodies, args.concurrency))
            gw_cpu = (cpu_seconds(gw.popen.pid) - g0) * 1000 / len(bench_pairs)
            print(row(f"[{store}] RM direct", direct))
            print(row(f"[{store}] through gateway", via))
            ov, enc = via["overhead"], via["encode"]
            added = pct(via["lat"], 50) - pct(direct["lat"], 50)
            print(
                f"[{store}] gateway overhead excl. encoding: p50 {pct(ov, 50):.3f} ms, "
                f"p99 {pct(ov, 99):.3f} ms, mean {statistics.fmean(ov):.3f} ms  "
                f"(target p50 <= 2, p99 <= 10; LiteLLM median 12)"
            )
            print(
                f"[{store}] encoding in the gateway (queue + batched encode): "
                f"p50 {pct(enc, 50):.2f} ms, p99 {pct(enc, 99):.2f} ms per request; "
                f"end-to-end p50 added vs direct: {added:.2f} ms"
            )
            print(
                f"[{store}] CPU per pair: RM process {rm_cpu:.2f} ms; gateway process "
                f"{gw_cpu:.2f} ms, of which encoding ~{encode_cpu:.2f} ms (CPU alone) -> "
                f"gateway's own CPU ~{gw_cpu - encode_cpu:.2f} ms/pair"
            )
            gw.kill(signal.SIGTERM)
            if redis is not None:
                redis.kill()
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
