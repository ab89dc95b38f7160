"""Tiny real encoders, built once per session (random weights, real loading code)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import tiny_bert, tiny_llama


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT encoder folder (mean pooling path)."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama causal LM folder (last-token pooling path)."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
