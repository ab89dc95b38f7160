"""``reward-router replay --encoder-backend``: the int8 ONNX encoder's features, cached apart
from the torch ones; an unknown backend is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reward_router_cli.main import app
from tests.replay.test_replay_cli import _write_files
from tests.tiny_models import tiny_bert


def _args(tmp: Path, pairs: Path, beh: Path, encoder: Path, backend: str) -> list[str]:
    return [
        "replay", "--pairs", str(pairs), "--behavior", str(beh), "--folds", "2", "--seeds", "1",
        "--policies", "bayesian,best-single", "--encoder", str(encoder),
        "--encoder-backend", backend, "--cache-dir", str(tmp / "cache"),
        "--set", "router.epochs=5", "--json", str(tmp / f"{backend}.json"),
    ]  # fmt: skip


def test_replay_with_the_onnx_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("REWARD_ROUTER_CACHE", str(tmp_path / "models-cache"))
    pairs, beh = _write_files(tmp_path)
    encoder = tiny_bert(tmp_path / "enc")
    runner = CliRunner()
    for backend in ("torch", "onnx-int8"):
        result = runner.invoke(app, _args(tmp_path, pairs, beh, encoder, backend))
        assert result.exit_code == 0, result.output
        data = json.loads((tmp_path / f"{backend}.json").read_text())
        assert data["pairs"] == 40 and set(data["policies"]) == {"bayesian", "best-single"}
    # One export, and the two backends' embeddings in separate cache entries.
    assert len(list((tmp_path / "models-cache").rglob("*-int8.onnx"))) == 1
    ids = {p.name for p in (tmp_path / "cache").iterdir()}
    assert len(ids) >= 2, ids


def test_replay_refuses_an_unknown_backend(tmp_path: Path) -> None:
    pairs, beh = _write_files(tmp_path, n=4)
    result = CliRunner().invoke(app, _args(tmp_path, pairs, beh, tmp_path / "enc", "tensorrt"))
    assert result.exit_code == 2
    assert "encoder_backend: must be one of" in result.output
