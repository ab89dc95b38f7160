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

# `${VAR:-default}`: every variable the file uses must have a default, so a bare `up` works.
_VAR = re.compile(r"\$\{([^}]*)\}")


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


def test_docker_compose_config_accepts_it(tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (the schema test above still runs)")
    # An empty environment: every variable must fall back to its default.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    for profile in ([], ["--profile", "train", "--profile", "gpu"]):
        r = subprocess.run(
            [binary, "-f", str(COMPOSE), *profile, "config", "-q"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert "not set" not in r.stderr, r.stderr


def test_every_variable_has_a_default() -> None:
    used = _VAR.findall(COMPOSE.read_text())
    assert used
    missing = [v for v in used if ":-" not in v]
    assert not missing, f"variables without a default: {missing}"


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


def test_two_gateways_wait_for_redis_and_every_rm(compose: dict[str, Any]) -> None:
    gateways = _gateways(compose)
    assert len(gateways) >= 2
    needed = {"redis", *_rm_services(compose)}
    published: set[str] = set()
    for name, svc in gateways.items():
        deps = svc["depends_on"]
        assert set(deps) == needed, name
        assert all(d["condition"] == "service_healthy" for d in deps.values()), name
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        assert svc["environment"]["REDIS_URL"].endswith("@redis:6379/0")
        config = _option(_command(svc), "--config")
        assert config is not None and (ROOT / config).resolve() == GATEWAY_YAML.resolve()
        published.update(p.rsplit(":", 1)[0] for p in svc["ports"])
    assert len(published) == len(gateways), "each replica on its own host port"


def test_gateway_yaml_names_every_pool_rm_by_service(compose: dict[str, Any]) -> None:
    from gateway.settings import load_settings

    settings = load_settings(GATEWAY_YAML)
    pool = {m.name: m.settings.port for m in load_pool(POOL)}
    assert [rm.name for rm in settings.rms] == list(pool)
    for rm in settings.rms:
        assert rm.url == f"http://{rm.name}:{pool[rm.name]}"
        assert rm.name in compose["services"]
    assert settings.host == "0.0.0.0"


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
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


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
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {ds["datasources"][0]["uid"]}


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


def test_gpu_profile_reserves_a_gpu_for_vllm(compose: dict[str, Any]) -> None:
    from services.settings import ServiceSettings

    vllm = compose["services"]["vllm"]
    assert vllm["profiles"] == ["gpu"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    rm = compose["services"]["vllm-rm"]
    env = {k[len("RR_RM_") :].lower(): v for k, v in rm["environment"].items()}
    env["vllm_model"] = _VAR.sub(lambda m: m.group(1).split(":-", 1)[1], env["vllm_model"])
    settings = ServiceSettings(**env)
    assert settings.backend == "vllm" and settings.vllm_url == "http://vllm:8000"
