"""Shared fixtures: a private redis-server per test session (never the machine's shared one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Proc, free_port, start_redis


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A redis-server on a free port with AOF persistence, stopped after the session."""
    data_dir: Path = tmp_path_factory.mktemp("redis")
    proc = start_redis(free_port(), data_dir)
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def redis_url(redis_proc: Proc) -> Iterator[str]:
    """URL of the private Redis, flushed before each test."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=redis_proc.port)
    client.flushall()
    client.close()
    yield f"redis://127.0.0.1:{redis_proc.port}/0"
