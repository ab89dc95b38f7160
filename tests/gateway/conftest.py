"""Shared real parts for the gateway tests, started once per session.

* ``router_dir``: a tiny real router artifact (tiny BERT encoder + router) over RMS;
* ``rm_pool``: one RM service process per name in RMS: two ``length`` RMs and a tiny random
  BERT reward model behind the ``hf`` backend. A test that kills one restarts it (same port).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.helpers import build_router, start_rm
from tests.procs import Proc
from tests.tiny_models import tiny_bert

RMS = ("len-a", "len-b", "tiny-bert")


@dataclass
class RMPoolProcs:
    root: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def urls(self) -> dict[str, str]:
        return {n: p.url for n, p in self.procs.items()}

    def start(self, name: str, **spec: Any) -> Proc:
        spec = spec or self.specs[name]
        self.specs[name] = spec
        self.procs[name] = start_rm(self.root, name, **spec)
        return self.procs[name]

    def restart(self, name: str) -> Proc:
        """Start ``name`` again on its old port (after a test killed it)."""
        old = self.procs[name]
        old.kill()
        return self.start(name, **{**self.specs[name], "port": old.port})


@pytest.fixture(scope="session")
def router_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_router(tmp_path_factory.mktemp("router"), RMS)


@pytest.fixture(scope="session")
def rm_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RMPoolProcs]:
    root = tmp_path_factory.mktemp("rms")
    pool = RMPoolProcs(root)
    model = tiny_bert(root / "tiny-bert-rm", seq_cls=True, seed=3)
    try:
        pool.start("len-a", backend="length")
        pool.start("len-b", backend="length")
        pool.start("tiny-bert", backend="hf", model=model)
        yield pool
    finally:
        for p in pool.procs.values():
            p.kill()
