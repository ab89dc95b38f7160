"""Real processes for tests: free ports, a redis-server, uvicorn services on loopback.

Every process started here is stopped by the context manager that started it, even when the
test fails, so no test leaves a server behind or touches the machine's shared Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def wait_for_http(
    url: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``url`` until it answers 200 (e.g. a service's /readyz)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {timeout}s (last: {last})")


@dataclass
class Proc:
    """A started child process, its port and its log file."""

    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    args: Sequence[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.wait(timeout=30)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_process(
    args: Sequence[str],
    port: int,
    *,
    env: Mapping[str, str] | None = None,
    ready_url: str | None = None,
    timeout: float = 60.0,
    cwd: str | Path | None = None,
) -> Proc:
    """Start ``args`` with its output in a temp log; wait for ``ready_url`` (or the port)."""
    fd, log_name = tempfile.mkstemp(prefix="rr-proc-", suffix=".log")
    log = Path(log_name)
    full_env = {**os.environ, **(env or {})}
    with os.fdopen(fd, "wb") as out:
        popen = subprocess.Popen(
            list(args), stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd
        )
    proc = Proc(popen=popen, port=port, log=log, args=list(args))
    try:
        if ready_url is not None:
            wait_for_http(ready_url, timeout=timeout, proc=popen)
        else:
            wait_for_port(port, timeout=timeout, proc=popen)
    except Exception as exc:
        proc.kill()
        raise RuntimeError(
            f"{' '.join(args)} failed to start: {exc}\n{proc.logs()[-4000:]}"
        ) from exc
    return proc


@contextmanager
def running(
    args: Sequence[str],
    port: int,
    *,
    env: Mapping[str, str] | None = None,
    ready_url: str | None = None,
    timeout: float = 60.0,
) -> Iterator[Proc]:
    """Context manager around :func:`start_process` that always stops the process."""
    proc = start_process(args, port, env=env, ready_url=ready_url, timeout=timeout)
    try:
        yield proc
    finally:
        proc.kill(signal.SIGTERM) if proc.popen.poll() is None else None
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.log.unlink(missing_ok=True)


def python_module_args(module: str, *extra: str) -> list[str]:
    """``python -m module extra...`` with the interpreter running the tests."""
    return [sys.executable, "-m", module, *extra]


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server is not installed (.ci/run installs Debian's redis-server)")
    return path


def start_redis(
    port: int, data_dir: Path, *, password: str | None = None, extra: Sequence[str] = ()
) -> Proc:
    """A private redis-server on ``port`` with append-only persistence in ``data_dir``."""
    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ]
    if password:
        args += ["--requirepass", password]
    return start_process([*args, *extra], port)


def _redis_client(port: int) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def _wait_until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # a server still starting up: asked again
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout}s")


@dataclass
class SentinelSetup:
    """A master, its replica and one Sentinel monitoring them as ``name``."""

    master: Proc
    replica: Proc
    sentinel: Proc
    name: str = "rr-master"

    def procs(self) -> list[Proc]:
        return [self.sentinel, self.replica, self.master]

    def master_port(self) -> int:
        """The port of the master the Sentinel names now."""
        client = _redis_client(self.sentinel.port)
        try:
            return int(client.sentinel_get_master_addr_by_name(self.name)[1])
        finally:
            client.close()

    def replica_known(self) -> bool:
        """Whether the Sentinel sees a replica in sync (what a failover needs)."""
        client = _redis_client(self.sentinel.port)
        try:
            replicas = client.sentinel_slaves(self.name)
        finally:
            client.close()
        return any(
            r.get("master-link-status") == "ok" and not r.get("is_disconnected") for r in replicas
        )

    def kill(self) -> None:
        for p in self.procs():
            p.kill()
            p.log.unlink(missing_ok=True)


def start_sentinel(data_dir: Path, name: str = "rr-master") -> SentinelSetup:
    """A master + replica (redis-server, AOF) and a ``redis-sentinel`` on free ports."""
    sentinel_bin = shutil.which("redis-sentinel")
    if sentinel_bin is None:
        raise RuntimeError("redis-sentinel is not installed (apt-get install redis-sentinel)")
    (data_dir / "master").mkdir(parents=True)
    (data_dir / "replica").mkdir()
    master = start_redis(free_port(), data_dir / "master")
    procs = [master]
    try:
        replica = start_redis(
            free_port(), data_dir / "replica", extra=["--replicaof", "127.0.0.1", str(master.port)]
        )
        procs.append(replica)
        port = free_port()
        conf = data_dir / "sentinel.conf"  # Sentinel rewrites its file: a writable copy each
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {data_dir}\n"
            f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {name} 2000\n"
            f"sentinel failover-timeout {name} 10000\n"
        )
        sentinel = start_process([sentinel_bin, str(conf)], port)
        procs.append(sentinel)
        setup = SentinelSetup(master, replica, sentinel, name)
        _wait_until("the Sentinel names the master", lambda: setup.master_port() == master.port)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return setup


def start_redis_cluster(data_dir: Path, nodes: int = 3) -> list[Proc]:
    """A Redis Cluster of ``nodes`` primaries (redis-server --cluster-enabled, AOF), all slots
    assigned by ``redis-cli --cluster create``; returns once every node says cluster_state:ok."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RuntimeError("redis-cli is not installed (Debian: apt-get install redis-tools)")
    procs: list[Proc] = []
    try:
        for i in range(nodes):
            d = data_dir / f"node-{i}"
            d.mkdir(parents=True)
            port = free_port()
            extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(d / "nodes.conf"),
                "--cluster-port",
                str(free_port()),
                "--cluster-node-timeout",
                "5000",
            ]
            procs.append(start_redis(port, d, extra=extra))
        addrs = [f"127.0.0.1:{p.port}" for p in procs]
        subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def all_ok() -> bool:
            for p in procs:
                client = _redis_client(p.port)
                try:
                    if client.cluster("INFO").get("cluster_state") != "ok":
                        return False
                finally:
                    client.close()
            return True

        _wait_until("the cluster is ok on every node", all_ok)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs
