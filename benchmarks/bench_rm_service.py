"""Throughput of one RM scoring service: micro-batching on vs off, 1 and 32 concurrent clients.

Starts two real services on loopback (same model, same settings, ``microbatch`` on and off),
then, for each, sends single-item ``/v1/score`` requests from 1 and from 32 concurrent clients
(real hh-rlhf prompts and responses), and prints items/s side by side and the on/off ratio.

    .venv/bin/python benchmarks/bench_rm_service.py                  # MiniLM-L6 RM, CPU
    .venv/bin/python benchmarks/bench_rm_service.py --model artifacts/rms/chat --requests 320

The default model is all-MiniLM-L6-v2 with a fresh one-output head: the architecture of the
pool's specialists (weights do not change the speed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reward_router.data import load_pairs, prompt_text  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seq_cls_folder(tmp: Path) -> Path:
    """all-MiniLM-L6-v2 saved as a 1-label sequence classifier (what `rm train` starts from)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from reward_router.models import minilm_path

    hf_logging.set_verbosity_error()
    out = tmp / "minilm-rm"
    AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1).save_pretrained(
        out
    )
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)
    return out


def start(model: Path, microbatch: bool, tmp: Path, args: argparse.Namespace) -> tuple[str, object]:
    port = free_port()
    cfg = tmp / f"rm-{'on' if microbatch else 'off'}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": f"bench-{'on' if microbatch else 'off'}",
                "backend": "hf",
                "model": str(model),
                "max_length": args.max_length,
                "max_batch_size": 32,
                "batch_wait_ms": args.wait_ms,
                "microbatch": microbatch,
                "torch_threads": args.threads,
                "port": port,
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "services", "serve", "--config", str(cfg), "--log-level", "warning"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}")
        time.sleep(0.2)
    raise TimeoutError("service not ready")


async def run_load(url: str, items: list[dict[str, str]], clients: int, n: int) -> float:
    """Items per second for ``n`` single-item requests from ``clients`` concurrent clients."""
    queue = list(range(n))

    async def client(c: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            r = await c.post("/v1/score", json={"items": [items[i % len(items)]]})
            r.raise_for_status()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        await c.post("/v1/score", json={"items": items[:4]})  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="HF seq-cls RM folder")
    parser.add_argument("--requests", type=int, default=256, help="requests at 32 clients")
    parser.add_argument("--single-requests", type=int, default=48, help="requests at 1 client")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    pairs = load_pairs(ROOT / "data/pairs/hh-rlhf.jsonl.gz")[:200]
    items = [{"prompt": prompt_text(p.prompt), "response": p.chosen} for p in pairs]
    with tempfile.TemporaryDirectory(prefix="bench-rm-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or seq_cls_folder(tmp)
        results: dict[tuple[bool, int], float] = {}
        for microbatch in (True, False):
            url, proc = start(model, microbatch, tmp, args)
            try:
                for clients, n in ((1, args.single_requests), (32, args.requests)):
                    results[(microbatch, clients)] = asyncio.run(run_load(url, items, clients, n))
            finally:
                proc.terminate()  # type: ignore[attr-defined]
                proc.wait(timeout=30)  # type: ignore[attr-defined]
    print(
        f"model: {model if args.model else 'all-MiniLM-L6-v2 + 1-output head'}; "
        f"max_length {args.max_length}; torch threads {args.threads}; 1 item per request"
    )
    print(f"{'clients':>8} {'microbatch on':>15} {'microbatch off':>15} {'on/off':>7}")
    for clients in (1, 32):
        on, off = results[(True, clients)], results[(False, clients)]
        print(f"{clients:>8} {on:>13.1f}/s {off:>13.1f}/s {on / off:>6.2f}x")


if __name__ == "__main__":
    main()
