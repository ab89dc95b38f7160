"""The Grafana dashboard against a real Prometheus scraping a real gateway and real RM services.

A private ``prometheus`` (Debian's package; ``.ci/run`` installs it) on a free port scrapes a
gateway process and two ``length`` RM service processes started here (the gateway tests'
helpers). After a few routes and feedbacks, every PromQL expression of
``deploy/grafana/dashboards/reward-router.json`` is evaluated through Prometheus's HTTP API: none
may error, and every metric it names must be one a service exports on ``/metrics``. The same
Prometheus loads the alert rules of ``deploy/prometheus/alerts.yml``: each rule's expression is
evaluated the same way, and every rule must report healthy after Prometheus has evaluated it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.helpers import (
    feedback,
    gateway_config,
    pairs,
    posteriors,
    route,
    start_gateway,
    start_rm,
)
from tests.procs import Proc, free_port, running

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "reward-router.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# Series Prometheus makes itself: `up` per target, `ALERTS` per active alert.
PROMETHEUS_MADE = {"up", "ALERTS"}

# What the issue asks the dashboard to show; each must be a panel title.
REQUIRED_PANELS = (
    "Route share per RM",
    "Pairs/s",
    "RM latency p50 / p99 (seen by the gateway)",
    "Fallbacks/s",
    "RM health",
    "Feedback/s by outcome",
    "Reward (−DPO loss) distribution",
    "Posterior mean norm per RM",
    "Posterior uncertainty per RM",
    "Gateway overhead p50 / p99",
)
# Panels whose queries must return series once there has been traffic (the others, e.g.
# fallbacks or store errors, are legitimately empty in a healthy run).
NON_EMPTY_PANELS = (
    "Route share per RM",
    "Pairs/s",
    "RM latency p50 / p99 (seen by the gateway)",
    "RM latency p50 / p99 (inside the RM service)",
    "RM health",
    "Feedback/s by outcome",
    "Posterior mean norm per RM",
    "Posterior uncertainty per RM",
    "Gateway overhead p50 / p99",
    "RM service requests/s by status",
)
# Grafana's built-in interval variables, replaced by a window that covers the whole test.
_INTERVALS = ("$__rate_interval", "$__interval", "$__range")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}
# Suffixes a sample name carries per metric type in the text exposition format.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def concrete(expr: str, dash: dict[str, Any]) -> str:
    """``expr`` with Grafana's variables replaced: intervals by 5m, template variables by .*"""
    for name in _INTERVALS:
        expr = expr.replace(name, "5m")
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            expr = expr.replace(f"${var['name']}", var.get("allValue") or ".*")
    assert "$" not in expr, f"unreplaced variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (identifiers that are not functions,
    aggregations, keywords, label names or label values)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end() :].lstrip().startswith("(") or m.group(0) in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def exported_names(metrics_text: str) -> set[str]:
    """Every sample name a /metrics page exports or would export (families without samples
    yet still declare their type)."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(metrics_text):
        names.update(fam.name + s for s in _SUFFIXES.get(fam.type, ("",)))
        names.update(s.name for s in fam.samples)
    return names


def test_dashboard_has_every_panel_the_issue_asks_for() -> None:
    dash = dashboard()
    titles = [p["title"] for p in dash["panels"]]
    assert all(t in titles for t in REQUIRED_PANELS), set(REQUIRED_PANELS) - set(titles)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(metric_names(t["expr"]) for t in p["targets"]), p["title"]


def alert_rules() -> list[dict[str, Any]]:
    doc: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_query_reads_the_datasource_variable() -> None:
    # One dashboard for any Prometheus: the compose stack's, or a cluster's (deploy/k8s).
    dash = dashboard()
    (ds,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    uids = set()
    for p in dash["panels"]:
        if p["type"] != "row":
            uids.add(p["datasource"]["uid"])
        uids.update(t["datasource"]["uid"] for t in p.get("targets", []))
    uids.update(v["datasource"]["uid"] for v in dash["templating"]["list"] if "datasource" in v)
    assert uids == {"${" + ds["name"] + "}"}


def test_alert_rules_are_named_and_shown() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) >= 5 and len(set(names)) == len(names)
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"], r["alert"]
    # The dashboard lists the firing ones.
    exprs = [e for t, e in targets(dashboard()) if t == "Firing alerts"]
    assert exprs and all("ALERTS" in e for e in exprs)


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus)")
    r = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_panels_fit_the_grid_without_overlapping() -> None:
    taken: dict[tuple[int, int], str] = {}
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{p['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = p["title"]


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (namespace, rm) (rate(a_total{namespace=~"x.*", le="0.5"}[5m])) '
        "/ ignoring (rm) group_left sum by (namespace) (rate(b_total[5m])) "
        "+ histogram_quantile(0.99, sum by (le) (rate(c_bucket[$__rate_interval]))) * up"
    )
    assert metric_names(expr) == {"a_total", "b_total", "c_bucket", "up"}


@dataclass
class Stack:
    prometheus: Proc
    gateway: Proc
    rms: list[Proc]
    exported: set[str]


def _query(prom: Proc, expr: str) -> dict[str, Any]:
    r = httpx.get(f"{prom.url}/api/v1/query", params={"query": expr}, timeout=30)
    body: dict[str, Any] = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.text}"
    return body


def _wait_for_samples(prom: Proc, expr: str, min_count: int, timeout: float = 90.0) -> None:
    """Wait until every series of ``expr`` has at least ``min_count`` scraped samples."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        res = _query(prom, f"min(count_over_time({expr}[10m]))")["data"]["result"]
        last = res
        if res and float(res[0]["value"][1]) >= min_count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus did not scrape {expr} {min_count} times: {last}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "the `prometheus` binary is missing: install Debian's package "
            "(apt-get install -y prometheus; .ci/run does this in CI)"
        )
    root = tmp_path_factory.mktemp("stack")
    rms = [start_rm(root, name, backend="length") for name in ("len-a", "len-b")]
    try:
        # No router artifact (fast start): a posterior policy that needs no offline prior.
        urls = {"len-a": rms[0].url, "len-b": rms[1].url}
        cfg = gateway_config(root, urls, policy={"name": "bayesian-no-offline"})
        gateway = start_gateway(cfg)
        try:
            port = free_port()
            prom_cfg = {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {"job_name": "gateway", "static_configs": [{"targets": [_hp(gateway)]}]},
                    {"job_name": "rm", "static_configs": [{"targets": [_hp(p) for p in rms]}]},
                ],
            }
            (root / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
            args = [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ]
            ready = f"http://127.0.0.1:{port}/-/ready"
            with running(args, port, ready_url=ready, timeout=120) as prom:
                exported = set()
                for p in (gateway, *rms):
                    exported |= exported_names(httpx.get(f"{p.url}/metrics", timeout=30).text)
                exported |= PROMETHEUS_MADE
                yield Stack(prom, gateway, rms, exported)
        finally:
            gateway.kill()
    finally:
        for p in rms:
            p.kill()


def _hp(proc: Proc) -> str:
    return f"127.0.0.1:{proc.port}"


def _drive_traffic(url: str, phase: int) -> None:
    """Routes in two namespaces, feedback applied, repeated and unknown, posterior reads."""
    for ns in ("run-a", "run-b"):
        res = route(url, pairs(6, offset=6 * phase), ns=ns)["results"]
        items = [(r["route_id"], -0.3 - 0.1 * i) for i, r in enumerate(res)]
        assert feedback(url, items)["applied"] == len(items)
        assert feedback(url, items[:1])["duplicate"] == 1
        ns_, gen, _uid = res[0]["route_id"].split(":")
        assert feedback(url, [(f"{ns_}:{gen}:missing", -0.5)])["unknown"] == 1
        posteriors(url, ns, full=False)


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Stack:
    """Two rounds of traffic with scrapes in between: a counter's first scraped value is its
    baseline, so rate() only sees what is added after it."""
    for phase, scrapes in ((0, 2), (1, 4)):
        _drive_traffic(stack.gateway.url, phase)
        for job_metric in ("reward_router_gateway_routes_total", "reward_router_rm_items_total"):
            _wait_for_samples(stack.prometheus, job_metric, scrapes)
        # The scrape after this phase's last feedback (counted once its value shows up).
        _wait_for_value(
            stack.prometheus, "sum(reward_router_gateway_feedback_total)", 16 * (phase + 1)
        )
    return stack


def _wait_for_value(prom: Proc, expr: str, value: float, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = _query(prom, expr)["data"]["result"]
        if last and float(last[0]["value"][1]) == value:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{expr} did not reach {value}: {last}")


def test_every_dashboard_query_evaluates_against_real_services(traffic: Stack) -> None:
    dash = dashboard()
    empty = []
    for title, expr in targets(dash):
        body = _query(traffic.prometheus, concrete(expr, dash))
        assert not body.get("warnings"), f"{title}: {body['warnings']}"
        unknown = metric_names(expr) - traffic.exported
        assert not unknown, f"{title}: {expr} names metrics no service exports: {unknown}"
        if title in NON_EMPTY_PANELS and not body["data"]["result"]:
            empty.append(f"{title}: {expr}")
    assert not empty, "queries without data after traffic:\n" + "\n".join(empty)

    for var in (v for v in dash["templating"]["list"] if v["type"] == "query"):
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
        assert m is not None and m.group(1) in traffic.exported, var["definition"]


def test_every_alert_rule_evaluates_against_real_services(traffic: Stack) -> None:
    for rule in alert_rules():
        expr = str(rule["expr"])
        body = _query(traffic.prometheus, expr)
        assert not body.get("warnings"), f"{rule['alert']}: {body['warnings']}"
        unknown = metric_names(expr) - traffic.exported
        assert not unknown, f"{rule['alert']}: {expr} names metrics no service exports: {unknown}"
    # Prometheus itself loaded every rule and evaluated it without error (1 s interval).
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(f"{traffic.prometheus.url}/api/v1/rules", timeout=30).json()
        loaded = {x["name"]: x for g in r["data"]["groups"] for x in g["rules"]}
        if loaded and all(x["health"] != "unknown" for x in loaded.values()):
            break
        assert time.monotonic() < deadline, "rules never evaluated"
        time.sleep(0.5)
    assert set(loaded) == {x["alert"] for x in alert_rules()}
    bad = {n: x.get("lastError") for n, x in loaded.items() if x["health"] != "ok"}
    assert not bad, bad


def test_route_share_sums_to_one_per_namespace(traffic: Stack) -> None:
    dash = dashboard()
    (expr,) = [e for t, e in targets(dash) if t == "Route share per RM"]
    result = _query(traffic.prometheus, concrete(expr, dash))["data"]["result"]
    share: dict[str, float] = {}
    for series in result:
        ns = series["metric"]["namespace"]
        share[ns] = share.get(ns, 0.0) + float(series["value"][1])
    assert set(share) == {"run-a", "run-b"}
    assert all(abs(v - 1.0) < 1e-9 for v in share.values()), share


def test_feedback_outcomes_reach_prometheus(traffic: Stack) -> None:
    expr = "sum by (outcome) (reward_router_gateway_feedback_total)"
    result = _query(traffic.prometheus, expr)["data"]["result"]
    got = {s["metric"]["outcome"]: float(s["value"][1]) for s in result}
    # traffic: 2 phases x 2 namespaces x (6 applied, 1 duplicate, 1 unknown).
    assert got == {"applied": 24.0, "duplicate": 4.0, "unknown": 4.0}


def test_the_name_check_flags_what_no_service_exports(stack: Stack) -> None:
    assert "reward_router_gateway_routes_total" in stack.exported
    assert "reward_router_rm_request_duration_seconds_bucket" in stack.exported
    assert "reward_router_gateway_routes" not in stack.exported
    expr = "sum(rate(reward_router_gateway_pairs_total[5m])) + up + vllm_made_up"
    missing = {"reward_router_gateway_pairs_total", "vllm_made_up"}
    assert metric_names(expr) - stack.exported == missing
