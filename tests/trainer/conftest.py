"""Real parts for the trainer tests, started once per session: two RM services (``length`` and
``verifier``, no model needed), a gateway on the private Redis, and a tiny random Llama policy.

The gateway runs the default ``bayesian`` policy over a tiny real router artifact (tiny BERT
encoder + router trained on random data), so every routed pair has a real context h.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.helpers import build_router, gateway_config, start_gateway, start_rm
from tests.procs import Proc
from tests.tiny_models import tiny_llama
from tests.trainer.data import write_prompts

RMS = ("length", "verifier")


@pytest.fixture(scope="session")
def trainer_rms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("trainer-rms")
    procs: list[Proc] = []
    try:
        for name in RMS:
            procs.append(start_rm(root, name, backend=name))
        yield {n: p.url for n, p in zip(RMS, procs, strict=True)}
    finally:
        for p in procs:
            p.kill()


@pytest.fixture(scope="session")
def trainer_gateway(
    tmp_path_factory: pytest.TempPathFactory, trainer_rms: dict[str, str], redis_proc: Proc
) -> Iterator[str]:
    """A gateway on the session's private Redis (its own key prefix), URL yielded."""
    root = tmp_path_factory.mktemp("trainer-gw")
    redis_url = f"redis://127.0.0.1:{redis_proc.port}/0"
    router = build_router(root, RMS)
    cfg = gateway_config(
        root, trainer_rms, router=router, redis_url=redis_url, key_prefix="rrtrain"
    )
    proc = start_gateway(cfg)
    try:
        yield proc.url
    finally:
        proc.kill()


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("policy") / "tiny-llama", seed=1)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chat and math prompts (math with reference answers, for the verifier RM)."""
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl")
