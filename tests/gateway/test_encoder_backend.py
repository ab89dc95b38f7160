"""A real gateway process serving its router with the int8 ONNX encoder (encoder_backend
onnx-int8): it exports the router's tiny BERT once into the model cache, routes, and learns
from feedback like the torch encoder; a backend that cannot run the encoder stops start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.conftest import RMPoolProcs
from tests.gateway.helpers import feedback, gateway_config, pairs, posteriors, route, start_gateway

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_gateway_routes_with_the_onnx_encoder(
    tmp_path: Path, router_dir: Any, rm_pool: RMPoolProcs
) -> None:
    cache = tmp_path / "cache"
    cfg = gateway_config(tmp_path, rm_pool.urls, router=router_dir, encoder_backend="onnx-int8")
    gw = start_gateway(cfg, env={"REWARD_ROUTER_CACHE": str(cache)})
    try:
        res = route(gw.url, pairs(6), ns="onnx")["results"]
        assert len(res) == 6 and all(r["preferred"] in ("a", "b", "tie") for r in res)
        assert len(list((cache / "models" / "onnx").glob("*-int8.onnx"))) == 1
        out = feedback(gw.url, [(r["route_id"], -0.5) for r in res])
        assert out == {"applied": 6, "duplicate": 0, "unknown": 0}
        assert sum(rm["observations"] for rm in posteriors(gw.url, "onnx")["rms"]) == 6
    finally:
        gw.kill()


def test_onnx_on_a_gpu_is_refused_at_start(
    tmp_path: Path, router_dir: Any, rm_pool: RMPoolProcs
) -> None:
    cfg = gateway_config(
        tmp_path,
        rm_pool.urls,
        router=router_dir,
        encoder_backend="onnx-int8",
        encoder_device="cuda",
    )
    args = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "encoder_device" in done.stderr and "onnx-int8" in done.stderr
