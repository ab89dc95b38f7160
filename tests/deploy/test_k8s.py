"""deploy/k8s: every overlay rendered by ``kubectl kustomize`` and checked offline.

No cluster here, so the rendered objects are read: validated against the Kubernetes API schemas
(``kubernetes-validate``, strict: an unknown field fails), the gateway settings of the ConfigMap
loaded by the gateway's own loader with the environment its Deployment gives it, each RM's
Deployment against its service file and the pool, every image, user, mount and port against
the Dockerfiles and the settings, every Service against the pods it selects, the
NetworkPolicies read as "who may reach whom", and no secret given a value anywhere.

``kubectl`` comes from Debian's kubernetes-client (kustomize v2) or any newer kubectl
(kustomize v5): the manifests render the same objects with both (.ci/run installs one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.pool import load_pool
from tests.deploy.test_dockerfiles import check_command, instructions

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "external-redis")
POOLS = {
    "cpu": ROOT / "deploy/rms/pool.yaml",
    "gpu": ROOT / "deploy/rms/pool-gpu.yaml",
    "external-redis": ROOT / "deploy/rms/pool.yaml",
}
# Kubernetes versions the objects must be valid for: the newest schemas kubernetes-validate
# ships, and an older release still common in managed clusters.
K8S_VERSIONS = ("latest", "1.30.0")
SECRET_WORDS = re.compile(r"KEY|PASSWORD|TOKEN|SECRET")
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
TRAINER = {"reward-router/gateway-client": "true"}

Obj = dict[str, Any]


def _kubectl() -> str:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.fail(
            "kubectl is missing: install Debian's kubernetes-client "
            "(apt-get install -y kubernetes-client; .ci/run does this in CI)"
        )
    return binary


def render(path: Path) -> list[Obj]:
    r = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {o: render(K8S / "overlays" / o) for o in OVERLAYS}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("REWARD_ROUTER_GATEWAY_", "RR_RM_")) or key == "REDIS_URL":
            monkeypatch.delenv(key)


def by_kind(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def workloads(objs: list[Obj]) -> dict[str, Obj]:
    """Deployments, StatefulSets and Jobs by name (their pod templates)."""
    return {
        o["metadata"]["name"]: o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")
    }


def pod_spec(w: Obj) -> Obj:
    spec: Obj = w["spec"]["template"]["spec"]
    return spec


def containers(w: Obj) -> list[Obj]:
    spec = pod_spec(w)
    return [*spec.get("initContainers", []), *spec["containers"]]


def config_map(objs: list[Obj], prefix: str) -> Obj:
    (cm,) = [
        o
        for o in objs
        if o["kind"] == "ConfigMap"
        and re.fullmatch(rf"{prefix}(-[a-z0-9]{{10}})?", o["metadata"]["name"])
    ]
    return cm


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- rendering and the schemas ------------------------------------------------------------------


def test_every_overlay_renders_the_parts_the_issue_asks_for(
    rendered: dict[str, list[Obj]],
) -> None:
    for overlay, objs in rendered.items():
        kinds = {o["kind"] for o in objs}
        assert {
            "Namespace",
            "Deployment",
            "Service",
            "ConfigMap",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "Job",
            "PersistentVolumeClaim",
        } <= kinds, overlay
        assert all(
            o["metadata"].get("namespace") == "reward-router"
            for o in objs
            if o["kind"] != "Namespace"
        ), overlay
        names = [(o["kind"], o["metadata"]["name"]) for o in objs]
        assert len(names) == len(set(names)), overlay
    assert "redis" in by_kind(rendered["cpu"], "StatefulSet")
    assert "redis" not in by_kind(rendered["external-redis"], "StatefulSet")
    assert {"vllm", "vllm-rm"} <= set(by_kind(rendered["gpu"], "Deployment"))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(
    rendered: dict[str, list[Obj]], version: str
) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    want = latest_version() if version == "latest" else version
    errors = []
    for overlay, objs in rendered.items():
        for o in objs:
            try:
                kubernetes_validate.validate(o, want, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{overlay} {o['kind']}/{o['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_the_schema_check_catches_a_bad_object(rendered: dict[str, list[Obj]]) -> None:
    import kubernetes_validate

    gateway = json.loads(json.dumps(by_kind(rendered["cpu"], "Deployment")["gateway"]))
    pod_spec(gateway)["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, "1.30.0", strict=True)


# ---- secrets ------------------------------------------------------------------------------------


def test_secrets_are_referenced_never_given(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objs in rendered.items():
        assert not by_kind(objs, "Secret"), f"{overlay}: a Secret with values is rendered"
        refs = set()
        for name, w in workloads(objs).items():
            for c in containers(w):
                for env in c.get("env", []):
                    if SECRET_WORDS.search(env["name"]):
                        assert "value" not in env, f"{overlay} {name}: {env['name']} has a value"
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref is None:
                        continue
                    refs.add((ref["name"], ref["key"]))
                    # Only the HF token (gated models) and vLLM's own key (behind a
                    # NetworkPolicy) may be absent; every other is required.
                    optional = ref.get("optional", False)
                    assert optional == (ref["key"] in ("hf-token", "vllm-api-key")), (
                        overlay,
                        name,
                        ref,
                    )
        needed = {
            ("reward-router", k) for k in ("api-keys", "admin-key", "rm-api-key", "redis-url")
        }
        assert needed <= refs, overlay
        assert (("reward-router", "redis-password") in refs) == (overlay != "external-redis")


# ---- the gateway ---------------------------------------------------------------------------------


def _gateway_env(w: Obj, values: dict[str, str]) -> dict[str, str]:
    """The gateway container's environment with each Secret key replaced by ``values[key]``."""
    (c,) = pod_spec(w)["containers"]
    out = {}
    for env in c["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        out[env["name"]] = values[ref["key"]] if ref else env["value"]
    return out


SECRET_VALUES = {
    "api-keys": '["trainer-key-1b7e93", "trainer-key-2c0d41"]',
    "admin-key": "admin-key-9f3e2a",
    "rm-api-key": "rm-key-44b1c0",
    "redis-url": "redis://:redis-pw-a81e@redis:6379/0",
}


def _mounted(c: Obj, path: str) -> Obj | None:
    for m in c.get("volumeMounts", []):
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
            return dict(m)
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmap_settings_load_with_the_gateway_loader(
    rendered: dict[str, list[Obj]],
    overlay: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.settings import load_settings
    from reward_router.errors import ConfigError

    objs = rendered[overlay]
    gw = by_kind(objs, "Deployment")["gateway"]
    (c,) = pod_spec(gw)["containers"]
    config = option(c["args"], "--config")
    assert config is not None
    mount = _mounted(c, config)
    assert mount is not None and mount.get("readOnly") is True
    (vol,) = [v for v in pod_spec(gw)["volumes"] if v["name"] == mount["name"]]
    cm = by_kind(objs, "ConfigMap")[vol["configMap"]["name"]]
    file = tmp_path / Path(config).name
    file.write_text(cm["data"][Path(config).relative_to(mount["mountPath"]).as_posix()])

    # Without the Secret's values the settings refuse to start: all interfaces, no key.
    with pytest.raises(ConfigError, match=r"^host: '0\.0\.0\.0' is reachable"):
        load_settings(file)
    for key, value in _gateway_env(gw, SECRET_VALUES).items():
        monkeypatch.setenv(key, value)
    s = load_settings(file)
    assert len(s.api_keys) == 2 and s.admin_key is not None and s.redis_url
    assert all(rm.api_key is not None for rm in s.rms)

    # Its RMs are the pool's, each at the Service of that RM on the RM's own port.
    pool = {m.name: m.settings.port for m in load_pool(POOLS[overlay])}
    assert [rm.name for rm in s.rms] == list(pool)
    services = by_kind(objs, "Service")
    for rm in s.rms:
        assert rm.url == f"http://{rm.name}:{pool[rm.name]}", rm.name
        assert [p["port"] for p in services[rm.name]["spec"]["ports"]] == [pool[rm.name]]
    # The port the pod exposes, the Service's and the probes'.
    assert c["ports"] == [{"name": "http", "containerPort": s.port}]
    assert services["gateway"]["spec"]["ports"][0]["port"] == s.port
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # Files the settings name lie on the pod's volumes.
    assert s.router_path is not None and _mounted(c, str(s.router_path)) is not None
    assert s.feature_cache_dir is not None and _mounted(c, str(s.feature_cache_dir)) is not None


def test_kubernetes_gateway_settings_are_the_compose_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.settings import load_settings

    monkeypatch.setenv("REWARD_ROUTER_GATEWAY_API_KEYS", '["trainer-key-1b7e93"]')
    compose = load_settings(ROOT / "deploy/gateway.yaml").model_dump()
    base = load_settings(K8S / "base/gateway-settings.yaml").model_dump()
    assert base == compose
    gpu = load_settings(K8S / "overlays/gpu/gateway-settings.yaml").model_dump()
    assert [r["name"] for r in gpu["rms"]] == [r["name"] for r in base["rms"]] + ["vllm-rm"]
    assert {**gpu, "rms": gpu["rms"][:-1]} == base


def test_gateway_replicas_autoscaling_and_disruption_budget(
    rendered: dict[str, list[Obj]],
) -> None:
    objs = rendered["cpu"]
    gw = by_kind(objs, "Deployment")["gateway"]
    assert gw["spec"]["replicas"] >= 2
    assert gw["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (c,) = pod_spec(gw)["containers"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    labels = gw["spec"]["template"]["metadata"]["labels"]
    hpa = by_kind(objs, "HorizontalPodAutoscaler")["gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "gateway",
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = by_kind(objs, "PodDisruptionBudget")["gateway"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


# ---- RMs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_deployment_and_service_per_pool_rm(
    rendered: dict[str, list[Obj]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reward_router.errors import ConfigError
    from services.settings import load_settings

    objs = rendered[overlay]
    deployments = by_kind(objs, "Deployment")
    services = by_kind(objs, "Service")
    rm_pods = {n for n, d in deployments.items() if n not in ("gateway", "vllm")}
    pool = load_pool(POOLS[overlay])
    assert rm_pods == {m.name for m in pool}
    for m in pool:
        d = deployments[m.name]
        (c,) = pod_spec(d)["containers"]
        args = c["args"]
        check_command(args)
        assert args[:2] == ["rm", "serve"] and option(args, "--host") == "0.0.0.0"
        config = ROOT / str(option(args, "--config"))
        assert config.resolve() == m.config.resolve(), m.name
        assert c["ports"] == [{"name": "http", "containerPort": m.settings.port}], m.name
        svc = services[m.name]
        assert svc["spec"]["ports"] == [
            {"name": "http", "port": m.settings.port, "targetPort": "http"}
        ]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        # The service file with the pod's environment: all interfaces, so a key is required.
        env = {e["name"]: e for e in c["env"]}
        ref = env["RR_RM_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("reward-router", "rm-api-key")
        with pytest.raises(ConfigError, match=r"^host: '0\.0\.0\.0' is reachable"):
            load_settings(config, host="0.0.0.0")
        with monkeypatch.context() as mp:
            mp.setenv("RR_RM_API_KEY", SECRET_VALUES["rm-api-key"])
            assert load_settings(config, host="0.0.0.0").api_key is not None
        # A model folder of the service file lies on the artifacts volume.
        model = m.settings.model
        if model and model.startswith(str(ROOT / "artifacts")):
            in_pod = "/app" + model[len(str(ROOT)) :]
            mount = _mounted(c, in_pod)
            assert mount is not None and mount.get("readOnly") is True, m.name


# ---- images, users, ports against the Dockerfiles ------------------------------------------------


def _dockerfile(tag: str) -> Path:
    return ROOT / "deploy/docker" / ("Dockerfile" if tag == "cpu" else f"Dockerfile.{tag}")


def test_images_users_and_mounts_match_the_dockerfiles(rendered: dict[str, list[Obj]]) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for overlay, objs in rendered.items():
        for name, w in workloads(objs).items():
            for c in containers(w):
                image = c["image"]
                repo, _, tag = image.partition(":")
                if repo == "reward-router":
                    ins = instructions(_dockerfile(tag))
                    assert ("ENTRYPOINT", '["reward-router"]') in ins, image
                    assert "command" not in c, f"{name}: the image's entrypoint runs"
                    check_command(c["args"])
                    uid = re.search(
                        r"useradd [^&]*--uid (\d+)", " ".join(a for i, a in ins if i == "RUN")
                    )
                    assert uid is not None
                    assert pod_spec(w)["securityContext"]["runAsUser"] == int(uid.group(1)), name
                    assert pod_spec(w)["securityContext"]["runAsNonRoot"] is True
                    env = dict(
                        a.split("=", 1) for i, a in ins if i == "ENV" for a in a.split() if "=" in a
                    )
                    assert _mounted(c, env["REWARD_ROUTER_CACHE"]) is not None, name
                elif repo == "redis":
                    assert image == compose["redis"]["image"], "Redis as in docker-compose.yml"
                elif repo == "vllm/vllm-openai":
                    pinned = re.search(r":-([^}]+)\}", compose["vllm"]["image"])
                    assert pinned is not None and tag == pinned.group(1), "vLLM as in compose"
                    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), "a pinned release, not latest"
                else:
                    raise AssertionError(f"{overlay} {name}: unexpected image {image}")


def test_services_select_pods_and_name_their_ports(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objs in rendered.items():
        pods = [w for w in workloads(objs).values() if w["kind"] != "Job"]
        for name, svc in by_kind(objs, "Service").items():
            chosen = [
                w
                for w in pods
                if selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
            ]
            assert len(chosen) == 1, f"{overlay} Service {name} selects {len(chosen)} workloads"
            ports = {p["name"] for c in containers(chosen[0]) for p in c.get("ports", [])}
            for p in svc["spec"]["ports"]:
                assert p["targetPort"] in ports, (overlay, name, p)


def test_prometheus_scrapes_every_pod_that_exports_metrics(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objs in rendered.items():
        for name, w in workloads(objs).items():
            if w["kind"] == "Job" or name == "redis":
                continue
            ann = w["spec"]["template"]["metadata"].get("annotations", {})
            assert ann.get("prometheus.io/scrape") == "true", (overlay, name)
            assert ann["prometheus.io/path"] == "/metrics"
            ports = {p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
            assert int(ann["prometheus.io/port"]) in ports, (overlay, name)
    assert "vllm" in workloads(rendered["gpu"])


def test_dashboard_and_alert_rules_ship_as_configmaps(rendered: dict[str, list[Obj]]) -> None:
    dashboard = ROOT / "deploy/grafana/dashboards/reward-router.json"
    alerts = ROOT / "deploy/prometheus/alerts.yml"
    for objs in rendered.values():
        cm = by_kind(objs, "ConfigMap")["reward-router-dashboard"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # Grafana's sidecar
        assert json.loads(cm["data"]["reward-router.json"]) == json.loads(dashboard.read_text())
        rules = by_kind(objs, "ConfigMap")["reward-router-alerts"]
        assert yaml.safe_load(rules["data"]["alerts.yml"]) == yaml.safe_load(alerts.read_text())


# ---- vLLM ----------------------------------------------------------------------------------------


def test_vllm_serves_a_pooling_model_on_the_gpus_it_requests(
    rendered: dict[str, list[Obj]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.settings import load_settings

    objs = rendered["gpu"]
    deployments = by_kind(objs, "Deployment")
    (vllm,) = pod_spec(deployments["vllm"])["containers"]
    assert vllm["command"] == ["vllm", "serve"]
    args = vllm["args"]
    assert option(args, "--runner") == "pooling"
    gpus = vllm["resources"]["limits"]["nvidia.com/gpu"]
    assert int(str(option(args, "--tensor-parallel-size"))) == int(gpus) >= 1
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == gpus
    model_cm = config_map(objs, "vllm-model")
    env = {e["name"]: e for e in vllm["env"]}
    assert args[0] == "$(VLLM_MODEL)"
    assert env["VLLM_MODEL"]["valueFrom"]["configMapKeyRef"]["name"] == model_cm["metadata"]["name"]
    # vLLM's --api-key and the key the RM service sends: the same Secret key.
    vllm_key = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]

    # The RM service in front of it: the same model, the RM's own tokenizer, vLLM's Service.
    (rm,) = pod_spec(deployments["vllm-rm"])["containers"]
    rm_env = {e["name"]: e for e in rm["env"]}
    for key in ("RR_RM_VLLM_MODEL", "RR_RM_TOKENIZER"):
        ref = rm_env[key]["valueFrom"]["configMapKeyRef"]
        assert ref == {"name": model_cm["metadata"]["name"], "key": "model"}
    assert rm_env["RR_RM_VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == vllm_key
    model = model_cm["data"]["model"]
    monkeypatch.setenv("RR_RM_VLLM_MODEL", model)
    monkeypatch.setenv("RR_RM_TOKENIZER", model)
    monkeypatch.setenv("RR_RM_API_KEY", SECRET_VALUES["rm-api-key"])
    s = load_settings(ROOT / str(option(rm["args"], "--config")), host="0.0.0.0")
    assert s.backend == "vllm" and s.vllm_model == s.tokenizer == model
    host, port = str(s.vllm_url).removeprefix("http://").split(":")
    assert by_kind(objs, "Service")[host]["spec"]["ports"][0]["port"] == int(port)
    assert int(port) == vllm["ports"][0]["containerPort"]


# ---- network policies ----------------------------------------------------------------------------


def _peers(objs: list[Obj], labels: dict[str, str]) -> list[Obj]:
    """Every ``from`` peer of the policies selecting a pod with ``labels`` (None: no policy)."""
    peers: list[Obj] = []
    for np in by_kind(objs, "NetworkPolicy").values():
        if selects(np["spec"]["podSelector"].get("matchLabels", {}), labels):
            assert np["spec"]["policyTypes"] == ["Ingress"]
            for rule in np["spec"].get("ingress", []):
                peers += rule["from"]
    return peers


def _reaches(peer: Obj, labels: dict[str, str], same_namespace: bool) -> bool:
    if "namespaceSelector" not in peer and not same_namespace:
        return False
    return selects(peer.get("podSelector", {}).get("matchLabels", {}), labels)


def test_network_policies_let_only_trainers_to_gateway_and_gateway_to_rms_and_redis(
    rendered: dict[str, list[Obj]],
) -> None:
    def pod(objs: list[Obj], name: str) -> dict[str, str]:
        labels: dict[str, str] = workloads(objs)[name]["spec"]["template"]["metadata"]["labels"]
        return labels

    for objs in rendered.values():
        deny = by_kind(objs, "NetworkPolicy")["reward-router-default-deny"]
        assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
        gateway = pod(objs, "gateway")
        job = pod(objs, "reward-router-router-train")
        stranger = {"app": "something-else"}

        def may(src: dict[str, str], dst: dict[str, str], same_ns: bool = True) -> bool:
            return any(_reaches(p, src, same_ns) for p in _peers(objs, dst))  # noqa: B023

        assert may(TRAINER, gateway, same_ns=False) and may(PROMETHEUS, gateway, same_ns=False)
        assert not may(stranger, gateway) and not may(gateway, gateway)
        rms = [
            n
            for n, w in workloads(objs).items()
            if w["kind"] == "Deployment" and n not in ("gateway", "vllm")
        ]
        for name in rms:
            rm = pod(objs, name)
            assert may(gateway, rm) and may(job, rm) and may(PROMETHEUS, rm, same_ns=False)
            assert not may(TRAINER, rm, same_ns=False) and not may(stranger, rm)
            assert not may(gateway, rm, same_ns=False), "the gateway of another namespace"
        if "redis" in workloads(objs):
            redis = pod(objs, "redis")
            assert may(gateway, redis)
            assert not any(may(x, redis) for x in (TRAINER, job, PROMETHEUS, stranger))
        if "vllm" in workloads(objs):
            vllm = pod(objs, "vllm")
            assert may(pod(objs, "vllm-rm"), vllm) and may(PROMETHEUS, vllm, same_ns=False)
            assert not may(gateway, vllm) and not may(TRAINER, vllm, same_ns=False)


# ---- the router-training Job ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_training_job_writes_the_router_the_gateway_loads(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    job = by_kind(objs, "Job")["reward-router-router-train"]
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    (collect,) = spec["initContainers"]
    (train,) = spec["containers"]
    for c in (collect, train):
        check_command(c["args"])
    assert collect["args"][:2] == ["rm", "collect"] and train["args"][:2] == ["router", "train"]
    pool = ROOT / str(option(collect["args"], "--rms"))
    assert pool.resolve() == POOLS[overlay].resolve()
    assert option(collect["args"], "--out") == option(train["args"], "--behavior")
    out = str(option(train["args"], "--out"))
    gw_settings = yaml.safe_load(
        next(iter(config_map(objs, "reward-router-gateway")["data"].values()))
    )
    assert out == gw_settings["router_path"]
    mount = _mounted(train, out)
    assert mount is not None and not mount.get("readOnly", False)
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    gw = by_kind(objs, "Deployment")["gateway"]
    gw_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(gw)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert vol["persistentVolumeClaim"]["claimName"] in gw_claims
    pairs = {e["name"]: e.get("value") for e in train["env"]}["PAIRS"]
    assert pairs is not None and (ROOT / pairs.removeprefix("/app/")).is_file()
