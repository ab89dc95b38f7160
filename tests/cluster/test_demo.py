"""``reward-router demo`` as a real process, end to end, with tiny models built in the test.

The demo's stages are the project's real commands (rm build, router train, up, the label stream
through the gateway, train-dpo) on the shipped data and the shipped specialist RMs (MiniLM-L6
with the adapters of data/specialists); the router's encoder and the policy are swapped for tiny
ones through the demo's own options (--encoder, --policy), so a run takes a minute or two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reward_router.errors import ConfigError
from reward_router_cli.demo import DemoConfig, settings_key
from reward_router_cli.demo_report import routing_summary
from tests.tiny_models import tiny_bert, tiny_llama

REPO = Path(__file__).resolve().parents[2]


def _demo(*args: str, cache: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["REWARD_ROUTER_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "reward_router_cli", "demo", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_bad_settings_are_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="steps"):
        DemoConfig.build(steps=0)
    res = _demo("--samples-per-prompt", "1", "--out", str(tmp_path / "r"), cache=tmp_path)
    assert res.returncode == 2 and "samples_per_prompt" in res.stderr
    # A report folder that holds something is never written into.
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    res = _demo("--out", str(used), "--policy", str(tmp_path / "nothing"), cache=tmp_path)
    assert res.returncode == 2 and "out" in res.stderr and "not empty" in res.stderr
    assert [p.name for p in used.iterdir()] == ["keep.txt"]


def test_settings_key_changes_with_the_settings() -> None:
    assert settings_key(domain="chat", pairs=400) != settings_key(domain="chat", pairs=401)
    assert settings_key(domain="chat", pairs=400) == settings_key(pairs=400, domain="chat")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two whole demo runs, each bounded by _demo's own 900 s
def test_demo_end_to_end_then_from_the_cache(tmp_path: Path) -> None:
    bert = tiny_bert(tmp_path / "bert")
    llama = tiny_llama(tmp_path / "llama", seed=1)
    cache = tmp_path / "cache"
    common = [
        "--steps", "2", "--prompts-per-step", "2", "--max-new-tokens", "6",
        "--encoder", str(bert), "--policy", str(llama),
        "--router-pairs", "60", "--label-pairs", "24", "--threads", "1",
    ]  # fmt: skip
    first = tmp_path / "report-1"
    res = _demo("--out", str(first), *common, cache=cache)
    assert res.returncode == 0, res.stderr[-4000:]
    report: dict[str, Any] = json.loads((first / "report.json").read_text())
    _check_report(first, report)
    stages = {s["stage"]: s for s in report["stages"]}
    assert not any(stages[s]["cached"] for s in ("rms", "behaviour", "router"))
    assert set(stages) >= {"models", "rms", "behaviour", "router", "cluster", "label", "train"}
    assert stages["behaviour"]["router_pairs"] == 60 and stages["behaviour"]["stream_pairs"] == 24
    # The cluster was stopped: no child of `reward-router up` is left running.
    children = json.loads((first / "cluster" / "logs" / "cluster.json").read_text())
    assert len(children) == 6
    assert not any(_alive(c["pid"]) for c in children.values())

    # A second run builds nothing: RMs, behaviour file and router come from the cache.
    second = tmp_path / "report-2"
    res = _demo("--out", str(second), *common, cache=cache)
    assert res.returncode == 0, res.stderr[-4000:]
    again = json.loads((second / "report.json").read_text())
    _check_report(second, again)
    cached = {s["stage"]: s["cached"] for s in again["stages"]}
    assert cached["rms"] and cached["behaviour"] and cached["router"]
    assert sorted(p.name for p in (cache / "demo").iterdir() if p.name.endswith(".part")) == []


def _check_report(folder: Path, report: dict[str, Any]) -> None:
    summary = report["summary"]
    steps = report["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    routed = sum(s["routed"] for s in steps)
    # Every pair went to exactly one RM and its reward was applied once, as the gateway says.
    assert routed == summary["routed"] == summary["feedback_applied"] > 0
    assert sum(p["observations"] for p in report["posteriors"]["rms"]) == routed
    assert report["posteriors"]["policy"] == "bayesian"
    assert report["rms"] == ["chat-rm", "safety-rm", "math-rm", "verifier", "length"]
    routing = report["routing"]
    assert sum(routing["counts"].values()) == routed
    assert abs(sum(routing["share"].values()) - 1) < 1e-9
    by_domain = routing["by_domain"]
    assert set(by_domain) <= {"chat", "safety", "math"}
    assert sum(sum(d["counts"].values()) for d in by_domain.values()) == routed
    per_step = {rm: sum(s["rm_counts"].get(rm, 0) for s in steps) for rm in report["rms"]}
    assert per_step == routing["counts"]
    assert set(report["pool_accuracy"]) >= {"chat", "safety", "math"}
    # The label stage: every stream pair labelled by one RM of the pool, and that RM said what
    # the shipped matrix says it said (the same specialists, served live).
    label = report["label"]
    rows = [json.loads(line) for line in (folder / "label.jsonl").read_text().splitlines()]
    assert label["pairs"] == len(rows) == 24
    assert {r["rm"] for r in rows} <= set(report["rms"])
    assert sum(sum(c.values()) for c in label["counts_by_domain"].values()) == 24
    assert label["matrix_agreement"] >= 0.9
    assert [q["pairs"] for q in label["quarters"]] == [6, 6, 6, 6]
    policy = np.array([r["correct"] for r in rows])
    assert label["overall"]["policy"][0] == pytest.approx(policy.mean())
    assert any(k.startswith("best-single (") for k in label["overall"])
    for name in ("label_accuracy.png", "label_routing.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in ("routing_share.png", "routing_by_domain.png", "dpo_loss.png", "rewards.png"):
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name
    md = (folder / "summary.md").read_text()
    assert f"**{routed} pairs routed, each to exactly one RM**" in md
    assert all(f"]({n})" in md for n in ("routing_share.png", "dpo_loss.png", "rewards.png"))


def test_routing_summary_counts_shares_halves_and_domains() -> None:
    log = [
        {"rm_counts": {"a": 2}, "rm_by_domain": {"chat": {"a": 2}}},
        {"rm_counts": {"a": 1, "b": 1}, "rm_by_domain": {"chat": {"b": 1}, "math": {"a": 1}}},
        {"rm_counts": {"b": 4}, "rm_by_domain": {"math": {"b": 4}}},
    ]
    s = routing_summary(log, ["a", "b", "c"])
    assert s["counts"] == {"a": 3, "b": 5, "c": 0}
    assert s["share"] == {"a": 3 / 8, "b": 5 / 8, "c": 0.0}
    assert s["first_half_share"] == {"a": 0.75, "b": 0.25, "c": 0.0}  # steps 1-2
    assert s["second_half_share"] == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert s["by_domain"]["math"]["counts"] == {"a": 1, "b": 4, "c": 0}
    assert s["by_domain"]["chat"]["share"]["a"] == 2 / 3
