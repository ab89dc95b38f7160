"""Shared fixtures: a private redis-server per test session (never the machine's shared one),
and on demand a private Sentinel setup and a private 3-node Redis Cluster."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import (
    Proc,
    SentinelSetup,
    free_port,
    start_redis,
    start_redis_cluster,
    start_sentinel,
)


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


@pytest.fixture(scope="session")
def redis_sentinel_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    """A master + replica + ``redis-sentinel`` on free ports (skipped without the binary)."""
    if shutil.which("redis-sentinel") is None:
        pytest.skip("redis-sentinel is not installed (Debian: apt-get install redis-sentinel)")
    setup = start_sentinel(tmp_path_factory.mktemp("sentinel"))
    try:
        yield setup
    finally:
        setup.kill()


@pytest.fixture
def redis_sentinel(redis_sentinel_setup: SentinelSetup) -> Iterator[SentinelSetup]:
    """The session's Sentinel setup, its master flushed before each test."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=redis_sentinel_setup.master_port())
    client.flushall()
    client.close()
    yield redis_sentinel_setup


@pytest.fixture(scope="session")
def redis_cluster_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    """A 3-node Redis Cluster on free ports (skipped without redis-server / redis-cli)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are needed for a Redis Cluster")
    nodes = start_redis_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield nodes
    finally:
        for p in nodes:
            p.kill()
            p.log.unlink(missing_ok=True)


@pytest.fixture
def redis_cluster_url(redis_cluster_nodes: list[Proc]) -> Iterator[str]:
    """URL of one node of the private cluster, every node flushed before each test."""
    import redis

    for p in redis_cluster_nodes:
        client = redis.Redis(host="127.0.0.1", port=p.port)
        client.flushall()
        client.close()
    yield f"redis://127.0.0.1:{redis_cluster_nodes[0].port}/0"
