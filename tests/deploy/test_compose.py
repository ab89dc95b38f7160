"""docker-compose.yml and the configs it mounts: valid against the Compose specification, and
consistent with the RM pool, the gateway settings and the Prometheus scrape config.

There is no Docker engine on the project's machines, so the file is checked statically: against
the Compose specification's JSON schema (``compose_spec.json``, see ``compose_spec.NOTICE``), by
``docker-compose config -q`` where that binary exists, and by reading what each service runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.pool import load_pool

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
POOL = ROOT / "deploy" / "rms" / "pool.yaml"
GATEWAY_YAML = ROOT / "deploy" / "gateway.yaml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SCHEMA = Path(__file__).with_name("compose_spec.json")

# `${VAR:-default}` for settings, `${VAR:?message}` for secrets: a bare `up` works once the
# secrets are set, and never with a key anyone could guess.
_VAR = re.compile(r"\$\{([^}]*)\}")
SECRETS = (
    "REWARD_ROUTER_API_KEY",
    "REWARD_ROUTER_ADMIN_KEY",
    "RM_API_KEY",
    "REDIS_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
)
# Optional credentials whose empty default means "none" (public models need no HF token; the
# vLLM server is on the compose network only, so its own key is optional).
OPTIONAL_CREDENTIALS = ("HF_TOKEN", "VLLM_API_KEY")
_SECRET_WORDS = re.compile(r"KEY|PASSWORD|TOKEN|SECRET|PASS\b")


def secret_env() -> dict[str, str]:
    """Real-looking values for every required secret (what an operator's .env file holds)."""
    return {name: f"{name.lower().replace('_', '-')}-{i}f3a9c2e" for i, name in enumerate(SECRETS)}


def resolved(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: the variable's value from ``env``, else its default."""

    def one(m: re.Match[str]) -> str:
        name, _, rest = m.group(1).partition(":")
        if name in env:
            return env[name]
        assert rest.startswith("-"), f"{name} is required and not in env"
        return rest[1:]

    return _VAR.sub(one, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read the environment first; the test judges the files alone.
    for key in list(os.environ):
        if key.startswith(("REWARD_ROUTER_GATEWAY_", "RR_RM_")) or key == "REDIS_URL":
            monkeypatch.delenv(key)


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def _serving(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services `docker compose up` starts without a profile."""
    return {n: s for n, s in compose["services"].items() if not s.get("profiles")}


def _rm_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _serving(compose).items() if _command(s)[:2] == ["rm", "serve"]}


def _gateways(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if _command(s)[:2] == ["gateway", "serve"]}


def _validator() -> jsonschema.Draft201909Validator:
    # The schema names draft 2019-09 as ".../2019-09/schema#" (trailing '#'), which jsonschema's
    # lookup by $schema does not recognise, so the draft is chosen here.
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = sorted(_validator().iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_bad_file(compose: dict[str, Any]) -> None:
    # Guards the check above against a schema that accepts anything.
    bad = json.loads(json.dumps(compose))
    bad["services"]["redis"]["healthcheck"]["intervall"] = "5s"
    bad["services"]["gateway-1"]["depends_on"]["redis"] = {"condition": "healthy"}
    assert len(list(_validator().iter_errors(bad))) >= 2


def _compose_config(
    tmp_path: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    # Only these variables: nothing of the caller's environment leaks in.
    full = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **env}
    return subprocess.run(
        [binary, "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        env=full,
        cwd=tmp_path,
        timeout=120,
    )


def test_docker_compose_config_accepts_it(tmp_path: Path) -> None:
    # The secrets set, nothing else: every other variable falls back to its default.
    for profile in ([], ["--profile", "train", "--profile", "gpu"]):
        r = _compose_config(tmp_path, secret_env(), *profile, "config", "-q")
        assert r.returncode == 0, r.stderr
        assert "not set" not in r.stderr, r.stderr


def test_docker_compose_refuses_to_start_without_each_secret(tmp_path: Path) -> None:
    for name in SECRETS:
        env = {k: v for k, v in secret_env().items() if k != name}
        r = _compose_config(tmp_path, env, "config", "-q")
        assert r.returncode != 0, f"compose accepted a missing {name}"
        assert f"set {name}" in r.stderr, r.stderr


def test_secrets_are_required_and_every_other_variable_has_a_default() -> None:
    used = _VAR.findall(COMPOSE.read_text())
    assert used
    for expr in used:
        name, _, rest = expr.partition(":")
        if name in SECRETS:
            assert rest.startswith("?"), f"secret {name} has a default: ${{{expr}}}"
        elif name in OPTIONAL_CREDENTIALS:
            assert rest == "-", f"{name}: only the empty default (none) is allowed"
        else:
            assert not _SECRET_WORDS.search(name), f"{name} looks like a secret: add it to SECRETS"
            assert rest.startswith("-"), f"variable without a default: ${{{expr}}}"
    assert set(SECRETS) <= {e.partition(":")[0] for e in used}


def _published(compose_text: str, env: dict[str, str]) -> dict[str, list[str]]:
    data = yaml.safe_load(resolved(compose_text, env))
    return {n: [str(p) for p in s["ports"]] for n, s in data["services"].items() if "ports" in s}


def test_no_published_port_binds_all_interfaces_by_default() -> None:
    published = _published(COMPOSE.read_text(), secret_env())
    assert {"gateway-1", "gateway-2", "prometheus", "grafana"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            # HOST_IP:HOST_PORT:CONTAINER_PORT; without the address Docker binds 0.0.0.0.
            assert port.count(":") == 2 and port.split(":")[0] == "127.0.0.1", (name, port)
    assert "redis" not in published, "Redis is for the gateways only (compose network)"
    # Told otherwise, every published port moves.
    told = _published(COMPOSE.read_text(), {**secret_env(), "BIND_ADDRESS": "10.1.2.3"})
    assert all(p.startswith("10.1.2.3:") for ports in told.values() for p in ports)


def test_docker_compose_renders_loopback_ports(tmp_path: Path) -> None:
    r = _compose_config(tmp_path, secret_env(), "--profile", "gpu", "config")
    assert r.returncode == 0, r.stderr
    rendered = yaml.safe_load(r.stdout)
    ports = [str(p) for s in rendered["services"].values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports), ports


def test_redis_has_a_volume_and_a_healthcheck(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    vols = [v.split(":")[0] for v in redis["volumes"]]
    assert any(v in compose["volumes"] for v in vols)
    assert redis["healthcheck"]["test"]
    # Exactly-once durability needs fsync per write (docs/gateway.md).
    cmd = _command(redis)
    assert _option(cmd, "--appendfsync") == "always" and _option(cmd, "--appendonly") == "yes"


def test_one_service_per_rm_of_the_default_pool(compose: dict[str, Any]) -> None:
    pool = load_pool(POOL)
    rms = _rm_services(compose)
    by_config = {}
    for name, svc in rms.items():
        cfg = _option(_command(svc), "--config")
        assert cfg is not None, name
        assert (ROOT / cfg).is_file(), f"{name}: {cfg} does not exist"
        # Bound to all interfaces inside the container, or no other service reaches it.
        assert _option(_command(svc), "--host") == "0.0.0.0", name
        by_config[(ROOT / cfg).resolve()] = name
    assert set(by_config) == {m.config for m in pool}
    for m in pool:
        name = by_config[m.config]
        assert name == m.name, "service name = RM name, so URLs and dashboards agree"
        svc = rms[name]
        assert str(m.settings.port) in [str(p) for p in svc["expose"]]
        assert str(m.settings.port) in " ".join(svc["healthcheck"]["test"])


def test_two_gateways_wait_for_redis_only(compose: dict[str, Any]) -> None:
    # RMs come and go through the gateway's health checks: waiting for all of them would
    # hold both gateways back on the slowest RM, defeating the fallback.
    gateways = _gateways(compose)
    assert len(gateways) >= 2
    published: set[str] = set()
    for name, svc in gateways.items():
        assert svc["depends_on"] == {"redis": {"condition": "service_healthy"}}, name
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        assert svc["environment"]["REDIS_URL"].endswith("@redis:6379/0")
        config = _option(_command(svc), "--config")
        assert config is not None and (ROOT / config).resolve() == GATEWAY_YAML.resolve()
        published.update(p.rsplit(":", 1)[0] for p in svc["ports"])
        assert (
            svc["environment"]["REWARD_ROUTER_GATEWAY_RM_API_KEY"]
            == "${RM_API_KEY:?set RM_API_KEY}"
        )
    assert len(published) == len(gateways), "each replica on its own host port"


def _service_env(compose: dict[str, Any], name: str, env: dict[str, str]) -> dict[str, str]:
    """A service's environment as compose gives it, with ``env`` for the variables."""
    raw = compose["services"][name].get("environment") or {}
    return {k: resolved(str(v), env) for k, v in raw.items()}


def test_gateway_yaml_names_every_pool_rm_by_service(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.settings import load_settings

    # The gateway's own loader on deploy/gateway.yaml plus the environment compose gives it.
    for key, value in _service_env(compose, "gateway-1", secret_env()).items():
        monkeypatch.setenv(key, value)
    settings = load_settings(GATEWAY_YAML)
    assert [k.get_secret_value() for k in settings.api_keys] == [
        secret_env()["REWARD_ROUTER_API_KEY"]
    ]
    assert all(
        rm.api_key is not None and rm.api_key.get_secret_value() == secret_env()["RM_API_KEY"]
        for rm in settings.rms
    )
    pool = {m.name: m.settings.port for m in load_pool(POOL)}
    assert [rm.name for rm in settings.rms] == list(pool)
    for rm in settings.rms:
        assert rm.url == f"http://{rm.name}:{pool[rm.name]}"
        assert rm.name in compose["services"]
    assert settings.host == "0.0.0.0"


def test_the_compose_gateway_refuses_placeholders_and_a_missing_key(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.settings import load_settings
    from reward_router.errors import ConfigError

    # The values the old compose file defaulted to.
    old = {**secret_env(), "REWARD_ROUTER_API_KEY": "change-me"}
    for key, value in _service_env(compose, "gateway-1", old).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=r"^api_keys\.0: a known placeholder"):
        load_settings(GATEWAY_YAML)
    monkeypatch.setenv("REWARD_ROUTER_GATEWAY_API_KEYS", "[]")
    with pytest.raises(ConfigError, match=r"^host: '0\.0\.0\.0' is reachable"):
        load_settings(GATEWAY_YAML)


def test_rm_services_get_a_key_for_their_all_interfaces_bind(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from reward_router.errors import ConfigError
    from services.settings import load_settings

    for name, svc in _rm_services(compose).items():
        cfg = ROOT / str(_option(_command(svc), "--config"))
        env = _service_env(compose, name, secret_env())
        assert env == {"RR_RM_API_KEY": secret_env()["RM_API_KEY"]}, name
        with monkeypatch.context() as mp:
            mp.setenv("RR_RM_API_KEY", env["RR_RM_API_KEY"])
            s = load_settings(cfg, host="0.0.0.0")
            assert s.api_key is not None and s.host == "0.0.0.0"
        with pytest.raises(ConfigError, match=r"^host: '0\.0\.0\.0' is reachable"):
            load_settings(cfg, host="0.0.0.0")


def test_trainer_is_a_profile_and_waits_for_a_gateway(compose: dict[str, Any]) -> None:
    trainer = compose["services"]["trainer"]
    assert trainer["profiles"] == ["train"]
    assert "trainer" not in _serving(compose)
    cmd = _command(trainer)
    assert cmd[0] == "train-dpo"
    gw = _option(cmd, "--gateway")
    assert gw is not None
    host = gw.split("//")[1].split(":")[0]
    assert host in _gateways(compose)
    assert trainer["depends_on"][host]["condition"] == "service_healthy"


def test_prometheus_scrapes_every_service(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    for name, svc in compose["services"].items():
        cmd = _command(svc)
        if cmd[:2] == ["rm", "serve"]:
            port = _option(cmd, "--port") or str(svc["expose"][0])
            assert f"{name}:{port}" in targets, name
        elif cmd[:2] == ["gateway", "serve"]:
            assert f"{name}:8080" in targets, name
    # vLLM's own metrics (queue, KV cache, latency) from the gpu profile's server.
    assert "vllm:8000" in targets
    assert prom["rule_files"] == ["alerts.yml"]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus)")
    r = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_is_provisioned_from_deploy_with_anonymous_viewers(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    prov = ROOT / mounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((prov / "dashboards" / "reward-router.yml").read_text())
    dash_dir = providers["providers"][0]["options"]["path"]
    assert (ROOT / mounts[dash_dir] / "reward-router.json").is_file()
    dashboard = json.loads((ROOT / mounts[dash_dir] / "reward-router.json").read_text())
    # The datasource variable defaults to the provisioned datasource.
    (var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert var["current"]["value"] == ds["datasources"][0]["uid"]
    assert (
        env["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:?set GRAFANA_ADMIN_PASSWORD}"
    )


def test_every_bind_mount_and_dockerfile_exists(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                # ./artifacts and ./runs are made by training runs (git-ignored).
                if src in ("./artifacts", "./runs"):
                    continue
                assert (ROOT / src).exists(), f"{name}: {src}"
            else:
                assert src in compose["volumes"], f"{name}: {src}"
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name


def test_gpu_profile_reserves_a_gpu_for_vllm(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.settings import load_settings

    vllm = compose["services"]["vllm"]
    assert vllm["profiles"] == ["gpu"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # The RM service in front of it: its service file plus the environment compose gives it.
    rm = compose["services"]["vllm-rm"]
    for key, value in _service_env(compose, "vllm-rm", secret_env()).items():
        monkeypatch.setenv(key, value)
    cmd = _command(rm)
    settings = load_settings(ROOT / str(_option(cmd, "--config")), host=_option(cmd, "--host"))
    assert settings.backend == "vllm" and settings.vllm_url == "http://vllm:8000"
    assert str(settings.port) in [str(p) for p in rm["expose"]]
    # Pinned, not :latest, and the RM's own tokenizer renders the prompts.
    assert re.fullmatch(r"vllm/vllm-openai:\$\{VLLM_TAG:-v\d+\.\d+\.\d+\}", vllm["image"])
    assert settings.tokenizer == settings.vllm_model
    # vLLM's --api-key (VLLM_API_KEY) and the key vllm-rm sends come from one variable.
    assert vllm["environment"]["VLLM_API_KEY"] == rm["environment"]["RR_RM_VLLM_API_KEY"]
    assert "VLLM_API_KEY" in vllm["environment"]["VLLM_API_KEY"]
    assert vllm["entrypoint"] == ["vllm", "serve"]
    served = [resolved(c, {}) for c in _command(vllm)]
    assert served[0] == settings.vllm_model and _option(served, "--runner") == "pooling"
    # One tensor-parallel shard per reserved GPU.
    assert _option(_command(vllm), "--tensor-parallel-size") == devices[0]["count"]
