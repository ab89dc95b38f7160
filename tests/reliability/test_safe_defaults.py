"""Safe by default: placeholder secrets are refused, and so is a bind other machines can reach
without a key, unless ``allow_unauthenticated`` says so (and the start-up log says it too).

Checked on the settings loaders themselves (YAML file + environment, as a deployment gives
them) and on real ``gateway serve`` / ``rm serve`` processes: a refused configuration exits 2
naming the field before anything listens; an allowed open one starts and warns. Loopback
without a key stays allowed: every other test's gateway and ``reward-router up`` rely on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from reward_router.errors import ConfigError
from reward_router.exposure import is_loopback, placeholder_secret
from tests.gateway.helpers import write_yaml
from tests.procs import free_port, running

RMS = [{"name": "a", "url": "http://127.0.0.1:1"}]
KEY = "k-7c1d9e04a2"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("REWARD_ROUTER_GATEWAY_", "RR_RM_")) or key == "REDIS_URL":
            monkeypatch.delenv(key)


@pytest.mark.parametrize(
    "value",
    [
        "change-me",
        "change-me-too",
        "change-me-redis",
        "CHANGEME",
        "Change_Me",
        "changethis",
        "password",
        "secret",
        "admin",
        "your-api-key",
        "replace-me-please",
    ],
)
def test_placeholders_are_recognised(value: str) -> None:
    assert placeholder_secret(value)


@pytest.mark.parametrize("value", [KEY, "k1", "sekret", "adm", "admin-key-81d2f4b9", "me-change"])
def test_real_keys_are_not_placeholders(value: str) -> None:
    assert not placeholder_secret(value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("gateway.example.org", False),
        ("", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# ---- gateway settings --------------------------------------------------------------------------


def _gateway(tmp_path: Path, **cfg: object) -> Path:
    return write_yaml(tmp_path / "gw.yaml", {"rms": RMS, "policy": {"name": "random"}, **cfg})


@pytest.mark.parametrize(
    ("cfg", "env", "field"),
    [
        ({"api_keys": ["change-me"]}, {}, "api_keys.0"),
        ({"api_keys": [KEY, "changeme"]}, {}, "api_keys.1"),
        ({}, {"REWARD_ROUTER_GATEWAY_API_KEYS": '["change-me"]'}, "api_keys.0"),
        ({}, {"REWARD_ROUTER_GATEWAY_ADMIN_KEY": "change-me-too"}, "admin_key"),
        ({}, {"REWARD_ROUTER_GATEWAY_RM_API_KEY": "password"}, "rm_api_key"),
        ({"rms": [{**RMS[0], "api_key": "change-me"}]}, {}, "rms.0.api_key"),
        ({}, {"REDIS_URL": "redis://:change-me-redis@redis:6379/0"}, "redis_url"),
    ],
)
def test_gateway_refuses_placeholder_secrets(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cfg: dict[str, object],
    env: dict[str, str],
    field: str,
) -> None:
    from gateway.settings import load_settings

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        load_settings(_gateway(tmp_path, **cfg))
    assert info.value.field == field
    assert "placeholder" in str(info.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5"])
def test_gateway_refuses_an_open_bind_without_a_key(tmp_path: Path, host: str) -> None:
    from gateway.settings import load_settings

    with pytest.raises(ConfigError) as info:
        load_settings(_gateway(tmp_path, host=host))
    assert info.value.field == "host"
    assert "allow_unauthenticated" in str(info.value) and "api_keys" in str(info.value)


def test_gateway_open_bind_with_a_key_or_on_purpose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.settings import load_settings

    keyed = load_settings(_gateway(tmp_path, host="0.0.0.0", api_keys=[KEY]))
    assert keyed.startup_warnings() == []
    monkeypatch.setenv("REWARD_ROUTER_GATEWAY_ALLOW_UNAUTHENTICATED", "true")
    open_ = load_settings(_gateway(tmp_path, host="0.0.0.0"))
    (warning,) = open_.startup_warnings()
    assert "0.0.0.0" in warning and "without api_keys" in warning
    for host in ("127.0.0.1", "::1", "localhost"):
        monkeypatch.delenv("REWARD_ROUTER_GATEWAY_ALLOW_UNAUTHENTICATED")
        loop = load_settings(_gateway(tmp_path, host=host))
        assert loop.api_keys == [] and loop.startup_warnings() == []
        monkeypatch.setenv("REWARD_ROUTER_GATEWAY_ALLOW_UNAUTHENTICATED", "true")


def test_rm_api_key_is_the_default_of_every_rm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.settings import load_settings

    own = "own-key-51ab"
    rms = [RMS[0], {"name": "b", "url": "http://127.0.0.1:2", "api_key": own}]
    monkeypatch.setenv("REWARD_ROUTER_GATEWAY_RM_API_KEY", KEY)
    s = load_settings(_gateway(tmp_path, rms=rms))
    keys = [rm.api_key.get_secret_value() if rm.api_key else None for rm in s.rms]
    assert keys == [KEY, own]
    shown = str(s.safe_dict())
    assert KEY not in shown and own not in shown and s.safe_dict()["rm_api_key"] == "configured"


def _serve_gateway(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--config", str(config), *extra]


def test_gateway_process_refuses_an_open_bind_before_listening(tmp_path: Path) -> None:
    port = free_port()
    cfg = _gateway(tmp_path, port=port)
    r = subprocess.run(
        _serve_gateway(cfg, "--host", "0.0.0.0"), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: host: '0.0.0.0' is reachable from other machines" in r.stderr
    r = subprocess.run(
        _serve_gateway(cfg),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "REWARD_ROUTER_GATEWAY_ADMIN_KEY": "change-me-too"},
    )
    assert r.returncode == 2 and "error: admin_key: a known placeholder" in r.stderr, r.stderr


def test_gateway_process_served_open_on_purpose_says_so(tmp_path: Path) -> None:
    port = free_port()
    cfg = _gateway(tmp_path, port=port, allow_unauthenticated=True)
    args = _serve_gateway(cfg, "--host", "0.0.0.0")
    with running(args, port, ready_url=f"http://127.0.0.1:{port}/healthz", timeout=120) as gw:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        log = gw.logs()
    assert f"gateway: serving on 0.0.0.0:{port} without api_keys" in log, log


# ---- RM service settings -----------------------------------------------------------------------


def _rm(tmp_path: Path, **cfg: object) -> Path:
    return write_yaml(tmp_path / "rm.yaml", {"name": "len", "backend": "length", **cfg})


def test_rm_service_refuses_a_placeholder_key_and_an_open_bind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.settings import load_settings

    monkeypatch.setenv("RR_RM_API_KEY", "change-me")
    with pytest.raises(ConfigError) as info:
        load_settings(_rm(tmp_path))
    assert info.value.field == "api_key"
    monkeypatch.delenv("RR_RM_API_KEY")
    with pytest.raises(ConfigError) as info:
        load_settings(_rm(tmp_path), host="0.0.0.0")
    assert info.value.field == "host" and "allow_unauthenticated" in str(info.value)
    assert load_settings(_rm(tmp_path)).startup_warnings() == []  # loopback, no key: fine
    monkeypatch.setenv("RR_RM_API_KEY", KEY)
    assert load_settings(_rm(tmp_path), host="0.0.0.0").startup_warnings() == []


def test_rm_process_refuses_an_open_bind_and_warns_when_allowed(tmp_path: Path) -> None:
    port = free_port()
    args = [sys.executable, "-m", "services", "serve", "--config"]
    r = subprocess.run(
        [*args, str(_rm(tmp_path, port=port)), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "host: '0.0.0.0' is reachable" in r.stderr
    cfg = _rm(tmp_path, port=port, allow_unauthenticated=True)
    full = [*args, str(cfg), "--host", "0.0.0.0", "--log-level", "warning"]
    with running(full, port, ready_url=f"http://127.0.0.1:{port}/readyz", timeout=120) as rm:
        log = rm.logs()
    assert f"rm len: serving on 0.0.0.0:{port} without api_key" in log, log
