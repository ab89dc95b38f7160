"""``reward-router up``: every RM service and the gateway replicas as supervised child processes.

A cluster file names the RM services (a pool file, or a list of service files), the gateway's
settings (a settings file and/or inline settings; without ``rms`` the gateway gets the pool's
names and URLs), how many gateway replicas run and on which ports, and a folder for each child's
log. See deploy/cluster.yaml and docs/operations.md::

    pool: rms/pool.yaml                 # or  rms: [rms/length.yaml, rms/verifier.yaml]
    gateway:
      config: gateway.yaml              # optional; relative to this file
      settings: {policy: {name: bayesian-no-offline}}   # optional, on top of config
      replicas: 2
      ports: [8080, 8081]               # optional; default: the settings' port, +1, +2, ...
    log_dir: logs/cluster               # relative to the current directory
    grace_s: 10                         # SIGTERM, then SIGKILL after this many seconds

Each child runs in its own process group, so a Ctrl-C in the terminal reaches only the
supervisor, which then stops every group (SIGTERM, SIGKILL after ``grace_s``): no orphans.

>>> cluster = load_cluster("deploy/cluster-light.yaml")          # doctest: +SKIP
>>> raise SystemExit(run_cluster(cluster))                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import typer
import yaml

from reward_router.errors import ConfigError, RewardRouterError
from reward_router.readiness import is_ready

#: Bytes of a failed child's log shown on the terminal.
LOG_TAIL_BYTES = 4000


@dataclass(frozen=True)
class ChildSpec:
    """One child process: a name, its command line, the URL its ``/readyz`` answers at."""

    name: str
    kind: str  # "rm" | "gateway"
    args: list[str]
    url: str
    log: Path


@dataclass(frozen=True)
class Cluster:
    """What ``up`` starts: the children (RMs first), where logs go, the stop grace period."""

    children: list[ChildSpec]
    log_dir: Path
    gateway_settings: dict[str, Any]
    grace_s: float = 10.0
    ready_timeout_s: float = 600.0


class ChildFailed(RuntimeError):
    """A child exited (or never got ready) while the cluster was starting or running."""

    def __init__(self, child: ChildSpec, why: str) -> None:
        self.child = child
        super().__init__(f"{child.name} {why}; last lines of {child.log}:\n{log_tail(child.log)}")


def log_tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    """The last ``size`` bytes of a log file (empty when there is none)."""
    if not path.exists():
        return ""
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - size))
        return fh.read().decode(errors="replace")


def _local(host: str, port: int) -> str:
    # A wildcard bind address is not something to connect to: probe loopback instead.
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def _rm_members(data: dict[str, Any], base: Path) -> list[tuple[Path, str, str, bool]]:
    """``(service file, RM name, local URL, needs a reference)`` for the pool file or the
    ``rms`` list. A ``verifier`` service abstains (ties) on a pair without a reference answer,
    so the gateway entry it gets says ``needs_reference`` and such pairs are routed elsewhere."""
    from services.pool import load_pool
    from services.settings import load_settings as load_rm_settings

    if ("pool" in data) == ("rms" in data):
        raise ConfigError("pool", "give exactly one of 'pool' (a pool file) or 'rms' (a list)")
    if "pool" in data:
        members = load_pool(base / str(data["pool"]))
        return [
            (
                m.config,
                m.name,
                _local(m.settings.host, m.settings.port),
                m.settings.backend == "verifier",
            )
            for m in members
        ]
    rms = data["rms"]
    if not isinstance(rms, list) or not rms or not all(isinstance(r, str) for r in rms):
        raise ConfigError("rms", "must be a non-empty list of RM service files")
    out = []
    for r in rms:
        s = load_rm_settings(base / r)
        out.append(((base / r).resolve(), s.name, _local(s.host, s.port), s.backend == "verifier"))
    names = [name for _, name, _, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError("rms", f"RM names must be unique, got {names}")
    return out


def load_cluster(path: str | Path) -> Cluster:
    """Read and validate a cluster file (RM settings and gateway settings included).

    Replicas > 1 need a shared store: ``REDIS_URL`` (or the settings' ``redis_url``).
    """
    from gateway.settings import load_settings as load_gateway_settings

    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"no such file: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{p}: must be a mapping")
    unknown = set(data) - {"pool", "rms", "gateway", "log_dir", "grace_s", "ready_timeout_s"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"{p}: unknown field")
    members = _rm_members(data, p.parent)

    gw = data.get("gateway") or {}
    if not isinstance(gw, dict) or set(gw) - {"config", "settings", "replicas", "ports"}:
        raise ConfigError("gateway", "a mapping of config, settings, replicas, ports")
    merged: dict[str, Any] = {}
    if gw.get("config"):
        gw_path = p.parent / str(gw["config"])
        if not gw_path.is_file():
            raise ConfigError("gateway.config", f"no such file: {gw_path}")
        merged.update(yaml.safe_load(gw_path.read_text()) or {})
    if not isinstance(gw.get("settings") or {}, dict):
        raise ConfigError("gateway.settings", "must be a mapping of gateway settings")
    merged.update(gw.get("settings") or {})
    merged.setdefault(
        "rms",
        [
            {"name": name, "url": url, "needs_reference": needs_ref}
            for _, name, url, needs_ref in members
        ],
    )
    replicas = gw.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ConfigError("gateway.replicas", f"must be a positive integer, got {replicas!r}")
    try:
        # Validate exactly as a replica will read it: this YAML, then the environment on top.
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "gateway.yaml").write_text(yaml.safe_dump(merged))
            settings = load_gateway_settings(Path(tmp) / "gateway.yaml")
    except ConfigError as exc:
        message = str(exc).removeprefix(f"{exc.field}: ")
        raise ConfigError(f"gateway.settings.{exc.field}", message) from None
    ports = gw.get("ports") or [settings.port + i for i in range(replicas)]
    if len(ports) != replicas or not all(isinstance(x, int) and 0 < x < 65536 for x in ports):
        raise ConfigError("gateway.ports", f"must be {replicas} port numbers, got {ports!r}")
    if replicas > 1 and not settings.uses_redis:
        raise ConfigError(
            "gateway.replicas",
            f"{replicas} replicas need a shared store: set REDIS_URL (without it each replica "
            "has its own embedded store, so they would learn apart); or use replicas: 1",
        )

    log_dir = Path(str(data.get("log_dir", "logs/cluster")))
    if not settings.uses_redis and settings.store_path is None:
        # One replica without Redis: a SQLite file next to the logs, so a restart of `up`
        # keeps every namespace and posterior (docs/reliability.md, durability).
        merged["store_path"] = str((log_dir / "gateway-state.db").resolve())
    py = sys.executable
    children = []
    for cfg, name, url, _ in members:
        args = [py, "-m", "services", "serve", "--config", str(cfg), "--log-level", "warning"]
        children.append(ChildSpec(name, "rm", args, url, log_dir / f"{name}.log"))
    gw_file = log_dir / "gateway.yaml"
    for i, port in enumerate(ports):
        name = f"gateway-{i + 1}"
        args = [py, "-m", "gateway", "serve", "--config", str(gw_file), "--port", str(port)]
        children.append(
            ChildSpec(name, "gateway", args, _local(settings.host, port), log_dir / f"{name}.log")
        )
    return Cluster(
        children=children,
        log_dir=log_dir,
        gateway_settings=merged,
        grace_s=_seconds(data, "grace_s", 10.0),
        ready_timeout_s=_seconds(data, "ready_timeout_s", 600.0),
    )


def _seconds(data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(key, f"must be a positive number of seconds, got {value!r}")
    return float(value)


class Supervisor:
    """Starts children in their own process groups, watches them, stops them all."""

    def __init__(self, cluster: Cluster, stop: threading.Event) -> None:
        self.cluster = cluster
        self.stop = stop
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, child: ChildSpec) -> None:
        with child.log.open("ab") as log:
            self.procs[child.name] = subprocess.Popen(
                child.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: Ctrl-C hits only the supervisor
            )
        self._write_state()

    def _write_state(self) -> None:
        # Operators (and the tests) find every child's PID here, also after a failed start.
        state = {
            c.name: {"pid": self.procs[c.name].pid, "url": c.url, "log": str(c.log)}
            for c in self.cluster.children
            if c.name in self.procs
        }
        (self.cluster.log_dir / "cluster.json").write_text(json.dumps(state, indent=2))

    def check_alive(self) -> None:
        for child in self.cluster.children:
            proc = self.procs.get(child.name)
            if proc is not None and proc.poll() is not None:
                raise ChildFailed(child, f"exited with code {proc.returncode}")

    def wait_ready(self) -> bool:
        """Poll every child's ``/readyz``; False when asked to stop first."""
        pending = list(self.cluster.children)
        deadline = time.monotonic() + self.cluster.ready_timeout_s
        while pending:
            self.check_alive()
            pending = [c for c in pending if not is_ready(c.url)]
            if not pending:
                return True
            if time.monotonic() > deadline:
                raise ChildFailed(pending[0], f"not ready in {self.cluster.ready_timeout_s}s")
            if self.stop.wait(0.2):
                return False
        return True

    def stop_all(self) -> None:
        """SIGTERM every group, SIGKILL what is left after the grace period."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.cluster.grace_s
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        self._signal_all(signal.SIGKILL)  # also reaches grandchildren of an exited leader
        for proc in self.procs.values():
            proc.wait()

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            # ProcessLookupError: the whole group is gone already.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)


def _print_table(cluster: Cluster, sup: Supervisor, out: IO[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="reward-router up: ready")
    for col in ("name", "kind", "url", "pid", "log"):
        table.add_column(col, overflow="fold")
    for c in cluster.children:
        table.add_row(c.name, c.kind, c.url, str(sup.procs[c.name].pid), str(c.log))
    Console(file=out, width=120).print(table)


def run_cluster(cluster: Cluster, out: IO[str] | None = None) -> int:
    """Start, wait until ready, print the URLs, run until SIGINT/SIGTERM; the exit code.

    0 after a requested stop, 1 when a child fails (its log tail goes to stderr).
    """
    out = out or sys.stdout
    busy = [c for c in cluster.children if is_ready(c.url)]
    if busy:
        who = f"{busy[0].url} ({busy[0].name})"
        print(f"error: something already answers at {who}; is a cluster running?", file=sys.stderr)
        return 1
    cluster.log_dir.mkdir(parents=True, exist_ok=True)
    ready_file = cluster.log_dir / "ready"
    ready_file.unlink(missing_ok=True)  # a stale one from an earlier run would lie
    # Owner-only: the merged gateway settings may hold API keys and a Redis password.
    fd = os.open(cluster.log_dir / "gateway.yaml", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(cluster.gateway_settings, fh)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    sup = Supervisor(cluster, stop)
    try:
        for child in cluster.children:
            sup.start(child)
        if sup.wait_ready():
            _print_table(cluster, sup, out)
            print("Ctrl-C or SIGTERM stops every process.", file=out, flush=True)
            # Scripts (and the tests) wait for this file rather than parse the table.
            ready_file.write_text("ready\n")
            while not stop.wait(0.5):
                sup.check_alive()
        return 0
    except ChildFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        ready_file.unlink(missing_ok=True)
        sup.stop_all()
        for s, handler in previous.items():
            signal.signal(s, handler)
        print("stopped.", file=out, flush=True)


def up(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Cluster file (deploy/cluster.yaml)")
    ] = Path("deploy/cluster.yaml"),
) -> None:
    """Start every RM service and the gateway replicas; stop them all on Ctrl-C / SIGTERM."""
    try:
        cluster = load_cluster(config)
    except RewardRouterError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_cluster(cluster))
