"""``reward-router up`` as a real process: start, route a pair, SIGTERM, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.gateway.helpers import feedback, pairs, route, write_yaml
from tests.procs import free_port, wait_for_http


def _light_cluster(tmp: Path, **gateway: Any) -> tuple[Path, dict[str, int]]:
    """A cluster file like deploy/cluster-light.yaml, on free ports, logs under ``tmp``."""
    ports = {"length": free_port(), "verifier": free_port(), "gateway": free_port()}
    for rm in ("length", "verifier"):
        write_yaml(tmp / f"{rm}.yaml", {"name": rm, "backend": rm, "port": ports[rm]})
    cfg = {
        "rms": ["length.yaml", "verifier.yaml"],
        "gateway": {
            "settings": {
                "port": ports["gateway"],
                "policy": {"name": "bayesian-no-offline"},
                "health_interval_s": 0.5,
            },
            **gateway,
        },
        "log_dir": str(tmp / "logs"),
        "grace_s": 5,
        "ready_timeout_s": 60,
    }
    return write_yaml(tmp / "cluster.yaml", cfg), ports


def _up(config: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | (env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "reward_router_cli", "up", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )


@contextmanager
def _running_up(config: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """``reward-router up`` as a child; killed after the block if the test did not stop it."""
    proc = _up(config, env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not _gone(p)]


def _wait_ready_file(log_dir: Path, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    """The supervisor writes ``ready`` after every child answered /readyz and the table."""
    deadline = time.monotonic() + timeout
    while not (log_dir / "ready").exists():
        assert proc.poll() is None, "reward-router up exited before it was ready"
        assert time.monotonic() < deadline, "reward-router up not ready in time"
        time.sleep(0.1)


def test_up_serves_routes_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config, ports = _light_cluster(tmp_path)
    with _running_up(config) as proc:
        gw = f"http://127.0.0.1:{ports['gateway']}"
        wait_for_http(gw + "/readyz", timeout=90, proc=proc)  # type: ignore[arg-type]
        _wait_ready_file(tmp_path / "logs", proc)
        state = json.loads((tmp_path / "logs" / "cluster.json").read_text())
        assert set(state) == {"length", "verifier", "gateway-1"}
        pids = [int(v["pid"]) for v in state.values()]
        assert all(not _gone(p) for p in pids)

        got = route(gw, pairs(2))["results"]
        assert len(got) == 2 and {r["rm"] for r in got} <= {"length", "verifier"}
        # One replica without Redis: `up` gives it a SQLite file, so its state is durable.
        assert httpx.get(gw + "/readyz").json()["durable"] is True
        assert (tmp_path / "logs" / "gateway-state.db").is_file()

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    # The table printed every child's URL (rich may fold a long cell, so look for the ports).
    for port in ports.values():
        assert str(port) in out
    assert _wait_gone(pids) == []
    assert all(_port_free(p) for p in ports.values())
    assert not (tmp_path / "logs" / "ready").exists()


def test_two_replicas_share_redis_and_stop_on_ctrl_c(tmp_path: Path, redis_url: str) -> None:
    ports = [free_port(), free_port()]
    config, rm_ports = _light_cluster(tmp_path, replicas=2, ports=ports)
    with _running_up(config, env={"REDIS_URL": redis_url}) as proc:
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url in urls:
            wait_for_http(url + "/readyz", timeout=90, proc=proc)  # type: ignore[arg-type]
        _wait_ready_file(tmp_path / "logs", proc)
        state = json.loads((tmp_path / "logs" / "cluster.json").read_text())
        assert set(state) == {"length", "verifier", "gateway-1", "gateway-2"}
        pids = [int(v["pid"]) for v in state.values()]
        # A route made on one replica is known to the other (the shared store): feedback there.
        rid = route(urls[0], pairs(1))["results"][0]["route_id"]
        assert feedback(urls[1], [(rid, 1.0)])["applied"] == 1
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert _wait_gone(pids) == []
    assert all(_port_free(p) for p in [*ports, rm_ports["length"], rm_ports["verifier"]])


def test_replicas_without_redis_are_refused_naming_the_field(tmp_path: Path) -> None:
    config, _ = _light_cluster(tmp_path, replicas=2)
    proc = _up(config)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "gateway.replicas" in err and "REDIS_URL" in err
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_bad_gateway_setting_names_the_field(tmp_path: Path) -> None:
    config, _ = _light_cluster(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["gateway"]["settings"]["max_pairs"] = 0
    write_yaml(config, data)
    proc = _up(config)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "gateway.settings.max_pairs" in err


def test_a_child_failing_at_start_stops_the_others(tmp_path: Path) -> None:
    config, ports = _light_cluster(tmp_path)
    # Hold the verifier's port with a socket that listens but never answers HTTP: the verifier
    # service cannot bind and exits during start-up.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", ports["verifier"]))
        blocker.listen(1)
        with _running_up(config) as proc:
            _, err = proc.communicate(timeout=90)
    assert proc.returncode == 1
    assert "verifier exited" in err
    assert "address already in use" in err.lower()  # the child's log tail
    state = json.loads((tmp_path / "logs" / "cluster.json").read_text())
    assert _wait_gone([int(v["pid"]) for v in state.values()]) == []
    assert _port_free(ports["length"]) and _port_free(ports["gateway"])


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-light.yaml"])
def test_shipped_cluster_files_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from reward_router_cli.cluster import load_cluster

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # cluster.yaml runs 2 replicas
    cluster = load_cluster(Path(__file__).parents[2] / "deploy" / name)
    kinds = [c.kind for c in cluster.children]
    assert kinds.count("gateway") == (2 if name == "cluster.yaml" else 1)
    assert kinds[0] == "rm"  # RMs are started first
    # The verifier ties on a pair without a reference answer: the gateway must know, so that
    # such pairs go to another RM (measured before the fix: 105 of 200 went to it and tied).
    needs_ref = {
        rm["name"]: rm.get("needs_reference", False) for rm in cluster.gateway_settings["rms"]
    }
    assert needs_ref["verifier"] is True
    assert not any(v for k, v in needs_ref.items() if k != "verifier")
