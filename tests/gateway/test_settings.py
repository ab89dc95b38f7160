"""Settings: YAML file, env vars on top, bad values named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.settings import load_settings
from reward_router.errors import ConfigError

RMS = [{"name": "a", "url": "http://127.0.0.1:1"}, {"name": "b", "url": "http://127.0.0.1:2"}]


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gw.yaml"
    p.write_text(text)
    return p


def test_yaml_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _yaml(
        tmp_path,
        "port: 9001\nroute_ttl_s: 60\napi_keys: [k1]\nadmin_key: adm\n"
        "rms:\n  - {name: a, url: 'http://127.0.0.1:1'}\n"
        "policy: {name: random, normalizer: zscore}\n",
    )
    monkeypatch.setenv("REWARD_ROUTER_GATEWAY_ROUTE_TTL_S", "120")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:7777/0")
    s = load_settings(cfg, port=9002)
    assert s.port == 9002  # explicit override beats file
    assert s.route_ttl_s == 120  # env beats file
    assert s.redis_url == "redis://127.0.0.1:7777/0"
    assert s.policy.name == "random" and s.policy.normalizer == "zscore"
    assert s.host == "127.0.0.1"  # loopback by default
    assert s.api_keys[0].get_secret_value() == "k1"
    dumped = repr(s) + str(s.safe_dict())
    assert "k1" not in dumped and "adm" not in dumped.replace("admin", "")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"rms": []}, "rms"),
        ({"rms": RMS, "route_ttl_s": 0}, "route_ttl_s"),
        ({"rms": RMS, "port": 70000}, "port"),
        ({"rms": [*RMS, RMS[0]]}, "rms"),
        ({"rms": RMS, "policy": {"normalizer": "minmax"}}, "policy.normalizer"),
        ({"rms": RMS, "bogus": 1}, "bogus"),
        ({"rms": [{"name": "a"}]}, "rms.0.url"),
    ],
)
def test_bad_values_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, **overrides)
    assert info.value.field == field


@pytest.mark.parametrize("policy", ["bayesian", "bayesian-no-online", "weighted-score"])
def test_a_policy_needing_the_router_prior_needs_router_path(policy: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, rms=RMS, policy={"name": policy})
    assert info.value.field == "policy.name" and "router_path" in str(info.value)
    assert "bayesian-no-offline" in str(info.value)
    s = load_settings(None, rms=RMS, policy={"name": policy}, router_path=tmp_path)
    assert s.policy.name == policy
    assert load_settings(None, rms=RMS, policy={"name": "bayesian-no-offline"}).router_path is None


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "nope.yaml")


def test_safe_dict_hides_the_redis_password() -> None:
    s = load_settings(
        None, rms=RMS, redis_url="redis://:s3cret@127.0.0.1:6390/0", policy={"name": "random"}
    )
    assert "s3cret" not in str(s.safe_dict())
    assert s.safe_dict()["redis_url"] == "redis://***@127.0.0.1:6390/0"


@pytest.mark.parametrize("which", ["shipped", "no-router"])
def test_serve_without_its_router_folder_is_one_line_and_exit_2(which: str, tmp_path: Path) -> None:
    """README's first gateway command, run where its router folder does not exist (the shipped
    file points at the container's /app/artifacts/router): one line naming the cause, exit 2."""
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    config = root / "deploy" / "gateway.yaml"
    if which == "no-router":
        config = tmp_path / "gw.yaml"
        config.write_text(
            f"rms: [{{name: a, url: 'http://127.0.0.1:9'}}]\nrouter_path: {tmp_path / 'missing'}\n"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "REWARD_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    if which == "no-router":
        assert lines[0].startswith("error: router_path: ") and "not a router artifact" in lines[0]
