"""Pair features and the embedding cache, on tiny real encoders."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from gateway.feature_cache import EmbeddingCache
from gateway.features import (
    HFEncoder,
    PairFeaturizer,
    load_encoder,
    pair_features,
)
from reward_router.data import PromptLike
from reward_router.errors import ConfigError

PROMPTS: list[PromptLike] = [
    "what is 2+2?",
    [{"role": "user", "content": "say yes"}],
    "help me with code",
]
RESP_A = ["4", "yes", "def f(): pass"]
RESP_B = ["5 is the answer", "no", "sorry, no"]


class CountingEncoder:
    """A real encoder that counts what it is asked to embed (to observe cache hits)."""

    def __init__(self, inner: HFEncoder) -> None:
        self.inner = inner
        self.ref, self.dim, self.max_length = inner.ref, inner.dim, inner.max_length
        self.calls = 0
        self.texts = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        return self.inner.encode(texts)

    def encode_pairs(self, firsts: list[str], seconds: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(firsts)
        return self.inner.encode_pairs(firsts, seconds)


def test_pair_features_is_order_invariant_and_laid_out() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    f = pair_features(a, b)
    assert f.shape == (5, 14) and f.dtype == np.float32
    np.testing.assert_array_equal(f, pair_features(b, a))
    np.testing.assert_allclose(f[:, :7], (a + b) / 2, rtol=1e-6)
    np.testing.assert_allclose(f[:, 7:], np.abs(a - b), rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        pair_features(a, b[:, :3])


def test_featurize_is_order_invariant_on_a_real_encoder(llama_dir: Path) -> None:
    fz = PairFeaturizer(load_encoder(str(llama_dir), progress=False))
    ab = fz.featurize(PROMPTS, RESP_A, RESP_B)
    ba = fz.featurize(PROMPTS, RESP_B, RESP_A)
    assert ab.shape == (3, 2 * fz.encoder.dim)
    np.testing.assert_array_equal(ab, ba)
    # Different responses give different pairs (the features carry information).
    assert not np.allclose(ab[0], ab[1])


def test_second_featurize_hits_the_disk_cache_with_identical_values(
    bert_dir: Path, tmp_path: Path
) -> None:
    uncached = PairFeaturizer(load_encoder(str(bert_dir), progress=False)).featurize(
        PROMPTS, RESP_A, RESP_B
    )
    first = CountingEncoder(load_encoder(str(bert_dir), progress=False))
    got1 = PairFeaturizer(first, tmp_path / "cache").featurize(PROMPTS, RESP_A, RESP_B)
    assert first.calls == 1 and first.texts == 6

    # A fresh featurizer (as in a second run) reads the shards from disk: no encoding at all.
    second = CountingEncoder(load_encoder(str(bert_dir), progress=False))
    got2 = PairFeaturizer(second, tmp_path / "cache").featurize(PROMPTS, RESP_A, RESP_B)
    assert second.calls == 0
    np.testing.assert_array_equal(got1, got2)
    np.testing.assert_allclose(got2, uncached, rtol=1e-5, atol=1e-6)

    # One new pair: only its two new sides are encoded.
    third = CountingEncoder(load_encoder(str(bert_dir), progress=False))
    got3 = PairFeaturizer(third, tmp_path / "cache").featurize(
        [*PROMPTS, "new prompt"], [*RESP_A, "x"], [*RESP_B, "y"]
    )
    assert third.calls == 1 and third.texts == 2
    np.testing.assert_array_equal(got3[:3], got1)


def test_duplicate_sides_are_encoded_once(bert_dir: Path) -> None:
    enc = CountingEncoder(load_encoder(str(bert_dir), progress=False))
    PairFeaturizer(enc).featurize(["p", "p"], ["same", "same"], ["other", "third"])
    assert enc.texts == 3


def test_cache_key_separates_max_length(bert_dir: Path, tmp_path: Path) -> None:
    long = PairFeaturizer(load_encoder(str(bert_dir), max_length=64), tmp_path)
    long.featurize(PROMPTS, RESP_A, RESP_B)
    short = CountingEncoder(load_encoder(str(bert_dir), max_length=16, progress=False))
    PairFeaturizer(short, tmp_path).featurize(PROMPTS, RESP_A, RESP_B)
    assert short.calls == 1


def test_two_writers_and_a_damaged_shard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w1, w2 = EmbeddingCache(tmp_path, "enc", 32), EmbeddingCache(tmp_path, "enc", 32)
    w1.put(["a" * 64], np.ones((1, 4), np.float32))
    w2.put(["b" * 64], np.full((1, 4), 2.0, np.float32))
    (w1.folder / "shard-broken.npz").write_bytes(b"not a zip")
    reader = EmbeddingCache(tmp_path, "enc", 32)
    with caplog.at_level(logging.WARNING, logger="gateway.features"):
        got = reader.get(["a" * 64, "b" * 64, "c" * 64])
    assert sorted(got) == ["a" * 64, "b" * 64]
    np.testing.assert_array_equal(got["b" * 64], [2.0] * 4)
    assert "shard-broken" in caplog.text
    # Writer 1 sees what writer 2 stored; no temporary files are left behind.
    assert "b" * 64 in w1.get(["b" * 64])
    assert not list(w1.folder.glob(".tmp-*"))


def test_encoders_pool_normalise_and_truncate(bert_dir: Path, llama_dir: Path) -> None:
    bert = load_encoder(str(bert_dir), max_length=256, progress=False)
    assert bert.pooling == "mean" and bert.max_length == 128  # capped by the position table
    llama = load_encoder(str(llama_dir), max_length=32, progress=False)
    assert llama.pooling == "last" and llama.max_length == 32
    long_text = "the answer is " * 400
    for enc in (bert, llama):
        out = enc.encode(["yes", long_text])
        assert out.shape == (2, enc.dim) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # A prompt far longer than the window must not push the response out of it.
    emb = llama.encode_pairs([long_text, long_text], ["yes good", "no bad"])
    assert not np.allclose(emb[0], emb[1])


def test_batching_does_not_change_results(llama_dir: Path) -> None:
    texts = ["a", "the answer is 42", "how", "yes " * 30, "b"]
    one = load_encoder(str(llama_dir), batch_size=1, progress=False).encode(texts)
    many = load_encoder(str(llama_dir), batch_size=4, progress=False).encode(texts)
    np.testing.assert_allclose(one, many, atol=1e-5)


def test_bad_encoder_settings_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_encoder(str(tmp_path / "nowhere"))
    assert err.value.field == "encoder"
    with pytest.raises(ConfigError) as err:
        load_encoder("minilm", max_length=0)
    assert err.value.field == "max_length"
