"""Fixtures of the RM-service tests: tiny real models on disk and real service processes."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.procs import Proc, free_port, python_module_args, running
from tests.tiny_models import tiny_bert, tiny_llama


def write_config(path: Path, **fields: Any) -> Path:
    """A service YAML file on a free port (unless ``port`` is given)."""
    fields.setdefault("port", free_port())
    path.write_text(yaml.safe_dump(fields))
    return path


def port_of(config: Path) -> int:
    return int(yaml.safe_load(config.read_text())["port"])


@contextmanager
def rm_service(
    config: Path, *, env: dict[str, str] | None = None, wait: str = "/readyz"
) -> Iterator[Proc]:
    """``python -m services serve --config FILE`` as a child process, stopped afterwards."""
    port = port_of(config)
    args = python_module_args(
        "services", "serve", "--config", str(config), "--log-level", "warning"
    )
    with running(
        args, port, env=env, ready_url=f"http://127.0.0.1:{port}{wait}", timeout=180
    ) as proc:
        yield proc


@contextmanager
def rm_services(*specs: tuple[Path, str]) -> Iterator[list[Proc]]:
    """Several services started at once (their imports and loads overlap), all stopped after.

    Each spec is ``(config, wait_path)``.
    """
    with ExitStack() as stack, ThreadPoolExecutor(len(specs)) as pool:
        managers = [rm_service(cfg, wait=wait) for cfg, wait in specs]
        futures = [pool.submit(m.__enter__) for m in managers]
        procs: list[Proc] = []
        errors: list[BaseException] = []
        for m, f in zip(managers, futures, strict=True):
            try:
                procs.append(f.result())
                stack.push(m.__exit__)
            except Exception as exc:  # keep stopping the others, then fail
                errors.append(exc)
        if errors:
            raise errors[0]
        yield procs


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 1-label BERT reward model (128 positions) with its tokenizer."""
    return tiny_bert(tmp_path_factory.mktemp("bert-rm"), seq_cls=True)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama causal LM with a chat template."""
    return tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def model_services(
    tmp_path_factory: pytest.TempPathFactory, bert_dir: Path
) -> Iterator[dict[str, Proc]]:
    """Three services on the tiny BERT, started together:

    * ``hf``: left truncation at 48 tokens, at most 8 items, a generous gathering window so
      concurrent requests visibly share forward passes;
    * ``strict``: truncation ``error`` and a max_length (512) past the model's 128 positions, so
      inputs of 129-512 tokens make the forward pass itself fail: a real model error;
    * ``missing``: a model folder that does not exist (never becomes ready).
    """
    d = tmp_path_factory.mktemp("model-services")
    common = {"backend": "hf", "model": str(bert_dir), "torch_threads": 1}
    hf = write_config(
        d / "hf.yaml",
        name="tiny-bert-rm",
        max_length=48,
        truncation="left",
        max_request_items=8,
        max_batch_size=64,
        batch_wait_ms=200,
        **common,
    )
    strict = write_config(
        d / "strict.yaml", name="strict-rm", max_length=512, truncation="error", **common
    )
    missing = write_config(
        d / "missing.yaml", name="missing-rm", backend="hf", model=str(d / "nope")
    )
    with rm_services((hf, "/readyz"), (strict, "/readyz"), (missing, "/healthz")) as procs:
        yield dict(zip(("hf", "strict", "missing"), procs, strict=True))


@pytest.fixture(scope="session")
def hf_service(model_services: dict[str, Proc]) -> Proc:
    return model_services["hf"]
