"""Real parts for the gateway tests: RM service processes, a tiny router artifact, gateways.

Everything is a real process on loopback (RM services with the ``length`` backend or a tiny
random BERT reward model, gateway replicas) or a real artifact built here (tiny BERT encoder +
an offline router trained for a few epochs on random features).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from tests.procs import Proc, free_port, start_process
from tests.tiny_models import tiny_bert

PAIRS_TEXT = [
    ("what is 2+2?", "4", "the answer is 5, clearly"),
    ("write code to add", "def add(a, b): return a + b", "no"),
    ("is this safe?", "yes it is safe", "sorry i can not help"),
    ("how are you", "good", "bad bad bad"),
    ("math: 3*3", "9", "the answer is nine or maybe ten"),
    ("help me", "of course, what do you need help with?", "no"),
]


def pairs(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct pairs (cycling through PAIRS_TEXT, numbered so no two are equal)."""
    out = []
    for i in range(offset, offset + n):
        p, a, b = PAIRS_TEXT[i % len(PAIRS_TEXT)]
        out.append({"id": f"p{i}", "prompt": f"{p} #{i}", "response_a": a, "response_b": b})
    return out


def build_router(root: Path, rms: Sequence[str], *, seed: int = 0) -> Path:
    """A tiny real router artifact: tiny BERT encoder folder + a router trained on random data,
    with a domain head (two domains), so the gateway serves a context of d + 2 + 1 dims."""
    from gateway.offline.model import RouterConfig
    from gateway.offline.train import train_router

    enc = tiny_bert(root / "encoder", hidden=16, seed=seed)
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(64, 32)).astype(np.float32)
    correct = rng.integers(0, 2, size=(64, len(rms))).astype(np.float64)
    cfg = RouterConfig(hidden_sizes=(16,), dim=6, epochs=3, patience=0, seed=seed)
    router, _ = train_router(
        feats,
        correct,
        list(rms),
        cfg,
        valid_fraction=0.0,
        encoder_ref=str(enc),
        max_length=64,
        domains=["chat" if v > 0 else "math" for v in feats[:, 0]],
    )
    assert router.domains == ["chat", "math"]
    out = root / "router"
    router.save(out)
    return out


def write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data)))
    return path


def start_rm(
    tmp: Path,
    name: str,
    *,
    backend: str = "length",
    model: Path | None = None,
    port: int | None = None,
    **extra: Any,
) -> Proc:
    port = port or free_port()
    cfg: dict[str, Any] = {"name": name, "backend": backend, "port": port, **extra}
    if model is not None:
        cfg["model"] = str(model)
    path = write_yaml(tmp / f"rm-{name}-{port}.yaml", cfg)
    args = [sys.executable, "-m", "services", "serve", "--config", str(path)]
    args += ["--log-level", "warning"]
    return start_process(args, port, ready_url=f"http://127.0.0.1:{port}/readyz", timeout=120)


def gateway_config(
    tmp: Path,
    rms: Mapping[str, str],
    *,
    router: Path | None = None,
    redis_url: str | None = None,
    port: int | None = None,
    **extra: Any,
) -> Path:
    cfg: dict[str, Any] = {
        "port": port or free_port(),
        "rms": [{"name": n, "url": u, "read_timeout_s": 20.0} for n, u in rms.items()],
        "health_interval_s": 0.5,
        "seed": 0,
        **extra,
    }
    if router is not None:
        cfg["router_path"] = str(router)
    if redis_url is not None:
        cfg["redis_url"] = redis_url
    return write_yaml(tmp / f"gateway-{cfg['port']}.yaml", cfg)


def start_gateway(config: Path, env: Mapping[str, str] | None = None) -> Proc:
    port = int(yaml.safe_load(config.read_text())["port"])
    args = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    return start_process(
        args, port, env=env, ready_url=f"http://127.0.0.1:{port}/readyz", timeout=120
    )


def create_namespace(
    url: str, ns: str, config: Mapping[str, Any] | None = None, key: str | None = None
) -> httpx.Response:
    """POST /v1/namespaces/{ns} (a route never creates one); 200, or 409 for another config."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = dict(config) if config is not None else None
    r = httpx.post(f"{url}/v1/namespaces/{ns}", json=body, headers=headers, timeout=60)
    assert r.status_code in (200, 409), r.text
    return r


def route(
    url: str,
    items: list[dict[str, Any]],
    ns: str = "default",
    key: str | None = None,
    *,
    create: bool = True,
) -> dict[str, Any]:
    """Route ``items`` in ``ns``; with ``create`` the namespace is created first (idempotent;
    one that exists with its own config is used as it is)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if create:
        create_namespace(url, ns, key=key)
    r = httpx.post(
        f"{url}/v1/route", json={"namespace": ns, "pairs": items}, headers=headers, timeout=60
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def feedback(url: str, items: list[tuple[str, float]], key: str | None = None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"feedback": [{"route_id": rid, "reward": r} for rid, r in items]}
    r = httpx.post(f"{url}/v1/feedback", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def posteriors(
    url: str, ns: str = "default", *, full: bool = True, key: str | None = None
) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    params = {"namespace": ns, "detail": "full" if full else "summary"}
    r = httpx.get(f"{url}/v1/posteriors", params=params, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out
