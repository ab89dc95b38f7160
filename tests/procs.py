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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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


def start_redis(port: int, data_dir: Path, *, password: str | None = None) -> Proc:
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
    return start_process(args, port)
