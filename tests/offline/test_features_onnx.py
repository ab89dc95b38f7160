"""The int8 ONNX Runtime encoder against the torch one, on a tiny real BERT (exported here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.features import PairFeaturizer, load_backend_encoder, load_encoder
from reward_router.errors import ConfigError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from gateway.features_onnx import OnnxEncoder, load_onnx_encoder

PROMPTS = ["what is 2+2?", "say yes please", "help me with code " * 30]
RESPONSES = ["4", "yes, of course. yes.", "def f(): pass " * 40]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


def test_int8_encoder_embeds_like_torch(bert_dir: Path, onnx_dir: Path) -> None:
    torch_enc = load_encoder(str(bert_dir), max_length=64, progress=False)
    enc = load_onnx_encoder(str(bert_dir), max_length=64, cache_dir=onnx_dir, progress=False)
    assert isinstance(enc, OnnxEncoder)
    assert (enc.dim, enc.max_length) == (torch_enc.dim, torch_enc.max_length)
    ref = torch_enc.encode_pairs(PROMPTS, RESPONSES)
    # Batch of 1 and of 3 (padding, truncation at 64 tokens, length sorting): the same rows.
    got = enc.encode_pairs(PROMPTS, RESPONSES)
    one = enc.encode_pairs(PROMPTS[2:], RESPONSES[2:])
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Dynamic int8 quantises activations with one scale per batch: a row moves a little with
    # its batch companions (~1e-4 here), never more.
    np.testing.assert_allclose(one[0], got[2], atol=2e-3)
    # int8 weights: close to the torch embedding, not equal to it.
    cos = (got * ref).sum(axis=1)
    assert cos.min() > 0.98, cos
    assert enc.encode_pairs([], []).shape == (0, enc.dim)
    assert enc.encode(["hello"]).shape == (1, enc.dim)


def test_export_happens_once_and_caches_stay_apart(bert_dir: Path, onnx_dir: Path) -> None:
    first = load_onnx_encoder(str(bert_dir), max_length=64, cache_dir=onnx_dir, progress=False)
    files = list(onnx_dir.glob("*.onnx"))
    stamp = files[0].stat().st_mtime_ns
    again = load_onnx_encoder(str(bert_dir), max_length=64, cache_dir=onnx_dir, progress=False)
    assert [f.stat().st_mtime_ns for f in onnx_dir.glob("*.onnx")] == [stamp]
    assert again.cache_id == first.cache_id and first.cache_id.startswith("onnx-int8#")
    # The torch and int8 embeddings of the same text never share a cache entry.
    torch_fz = PairFeaturizer(load_encoder(str(bert_dir), max_length=64, progress=False))
    assert torch_fz.key("p", "r") != PairFeaturizer(first).key("p", "r")


def test_backend_choice_is_checked(bert_dir: Path, llama_dir: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_backend_encoder(str(llama_dir), backend="onnx-int8")
    assert exc.value.field == "encoder_backend"
    with pytest.raises(ConfigError) as exc:
        load_backend_encoder(str(bert_dir), backend="onnx-int8", device="cuda")
    assert exc.value.field == "encoder_device"
    with pytest.raises(ConfigError) as exc:
        load_backend_encoder(str(bert_dir), backend="tensorrt")
    assert exc.value.field == "encoder_backend"
