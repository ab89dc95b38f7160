"""Fine-tuning the encoder with the router, on a tiny real Llama (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gateway.features import HFEncoder, load_encoder, weights_fingerprint
from gateway.offline.cli import app
from gateway.offline.finetune import finetune_router
from gateway.offline.model import OfflineRouter, RouterConfig
from reward_router.errors import ConfigError
from tests.offline.test_cli import train_args, write_data

N = 40
PROMPTS = [f"what is {i}?" for i in range(N)]
# RM "yes-rm" is right exactly when response a says yes: the text decides the route.
RESP_A = ["yes yes good" if i % 2 == 0 else "sorry no bad" for i in range(N)]
RESP_B = ["no"] * N
CORRECT = np.array([[1.0, 0.0] if i % 2 == 0 else [0.0, 1.0] for i in range(N)])
CFG = RouterConfig(hidden_sizes=(16,), dim=4, epochs=6, batch_size=8, select_margin=0.0)


def test_finetuned_encoder_routes_and_round_trips(llama_dir: Path, tmp_path: Path) -> None:
    before = weights_fingerprint(load_encoder(str(llama_dir), progress=False).model)
    router, report = finetune_router(
        PROMPTS,
        RESP_A,
        RESP_B,
        CORRECT,
        ["yes-rm", "no-rm"],
        CFG,
        encoder_ref=str(llama_dir),
        encoder_lr=1e-3,
        cache_dir=tmp_path / "cache",
    )
    assert report.best_epoch > 0 and report.valid_routing_acc > report.valid_best_single_acc
    assert router.encoder is not None and router.encoder_ref == "./encoder"
    assert weights_fingerprint(router.encoder.model) != before

    router.save(tmp_path / "art")
    saved = {p.name for p in (tmp_path / "art" / "encoder").iterdir()}
    assert "model.safetensors" in saved and not saved & {"pytorch_model.bin", "model.pt"}

    loaded = OfflineRouter.load(tmp_path / "art")
    fz_mem = router.load_featurizer()
    # The in-memory fine-tuned encoder runs on torch only: another backend is refused, not
    # silently ignored.
    with pytest.raises(ConfigError, match="encoder_backend"):
        router.load_featurizer(backend="onnx-int8")
    fz_disk = loaded.load_featurizer(tmp_path / "cache")
    assert isinstance(fz_disk.encoder, HFEncoder) and fz_disk.encoder.pooling == "last"
    # The loaded encoder keys the cache by its weights, so it finds the fine-tuned features.
    assert fz_disk.cache is not None and fz_disk.key("p", "r") == fz_mem.key("p", "r")
    f_mem = fz_mem.featurize(PROMPTS, RESP_A, RESP_B)
    f_disk = loaded.load_featurizer().featurize(PROMPTS, RESP_A, RESP_B)
    np.testing.assert_allclose(f_disk, f_mem, atol=1e-5)
    np.testing.assert_allclose(loaded.hidden(f_disk), router.hidden(f_mem), atol=1e-5)


def test_cli_finetune_encoder(tmp_path: Path, llama_dir: Path) -> None:
    pairs, behavior = write_data(tmp_path, n=16)
    args = train_args(pairs, behavior, tmp_path / "out", llama_dir, tmp_path / "cache")
    result = CliRunner().invoke(app, [*args, "--epochs", "2", "--finetune-encoder"])
    assert result.exit_code == 0, result.output
    assert "router (argmax BT score)" in result.stdout
    router = OfflineRouter.load(tmp_path / "out")
    assert router.encoder_ref == "./encoder"
    assert (tmp_path / "out" / "encoder" / "model.safetensors").exists()
    bad = CliRunner().invoke(app, [*args, "--finetune-encoder", "--encoder-lr", "0"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: encoder_lr:")
