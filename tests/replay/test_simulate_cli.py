"""``reward-router simulate`` end to end: real pairs files in, table + JSON out, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reward_router_cli.main import app
from tests.tiny_models import tiny_bert


def _pairs_file(path: Path, domains: dict[str, int], prefix: str) -> Path:
    rows = []
    for domain, n in domains.items():
        for i in range(n):
            rows.append(
                {
                    "id": f"{prefix}-{domain}-{i}",
                    "domain": domain,
                    "group": f"{prefix}-{domain}-g{i}",
                    "prompt": [{"role": "user", "content": f"{domain} question {i}"}],
                    "chosen": f"good {domain} answer {i}",
                    "rejected": f"bad answer {i}",
                }
            )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


SPEC_YAML = """\
description: a math specialist and a flat RM
rho: 0.5
rms:
  - name: math-rm
    default: 0.4
    accuracy: {math: 0.97}
  - name: flat-rm
    default: 0.7
"""


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("enc") / "model")


def test_simulate_cli_mixes_files_subsamples_and_writes_json(tmp_path: Path, encoder: Path) -> None:
    chat = _pairs_file(tmp_path / "chat.jsonl", {"chat": 60}, "a")
    math = _pairs_file(tmp_path / "math.jsonl", {"math": 20}, "b")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_YAML)
    out = tmp_path / "out.json"
    args = [
        "simulate", "--pairs", str(chat), "--pairs", str(math), "--rms", str(spec),
        "--max-pairs", "50", "--folds", "2", "--seeds", "1", "--encoder", str(encoder),
        "--cache-dir", str(tmp_path / "cache"), "--set", "router.epochs=5", "--json", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    # the replay's own shape, on the subsample: all 20 math pairs, 30 chat
    assert data["pairs"] == 50 and data["rms"] == ["math-rm", "flat-rm"]
    sim = data["simulation"]
    assert sim["domains"] == {"chat": 30, "math": 20}
    assert sim["spec"]["rho"] == 0.5 and sim["spec"]["rms"][0]["accuracy"] == {"math": 0.97}
    assert sim["expected_accuracy"]["math-rm"] == {"chat": 0.4, "math": 0.97}
    assert sim["accuracy"]["math-rm"]["math"] > sim["accuracy"]["flat-rm"]["math"]
    assert sim["best_per_domain"]["rm"] == {"chat": "flat-rm", "math": "math-rm"}
    assert sim["best_per_domain"]["accuracy"] > sim["best_single"]["accuracy"]
    assert sim["oracle"] >= sim["best_per_domain"]["accuracy"]
    assert set(sim["domain_probe"]["recall"]) == {"chat", "math"}
    assert 0.0 <= sim["domain_probe"]["routed_accuracy"] <= sim["oracle"]
    policies = data["policies"]
    assert {"bayesian", "best-single", "majority", "oracle", "laser"} <= set(policies)
    assert policies["majority"]["rm_calls_per_pair"] == 2.0
    assert set(policies["bayesian"]["by_domain"]) == {"chat", "math"}
    assert set(data["gap_closed"]) >= {"bayesian", "bayesian-no-online"}
    assert data["paper"]["labelling_accuracy_percent"]["BayesianRouter"] == 88.23
    for line in ("best-single", "best RM per domain", "oracle (some RM right)", "88.23"):
        assert line in result.output

    # a preset, same seed twice: the same simulated matrix (the features come from the cache)
    outs = []
    for k in range(2):
        outs.append(tmp_path / f"preset{k}.json")
        args = [
            "simulate", "--pairs", str(chat), "--pairs", str(math), "--rms", "complementary",
            "--rho", "0.1", "--policies", "best-single,majority", "--folds", "2", "--seeds",
            "1", "--encoder", str(encoder), "--cache-dir", str(tmp_path / "cache"),
            "--json", str(outs[-1]),
        ]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    first, second = (json.loads(p.read_text()) for p in outs)
    assert first["simulation"]["spec"]["rho"] == 0.1
    assert first["simulation"]["accuracy"] == second["simulation"]["accuracy"]
    assert first["policies"] == second["policies"]
    assert first["gap_closed"] == {}  # no router policy was asked for


def test_simulate_cli_bad_input_names_the_problem(tmp_path: Path) -> None:
    pairs = _pairs_file(tmp_path / "p.jsonl", {"chat": 4}, "a")
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC_YAML.replace("0.97", "1.2"))

    def run(*extra: str) -> str:
        result = CliRunner().invoke(app, ["simulate", "--pairs", str(pairs), *extra])
        assert result.exit_code == 2, result.output
        return result.output

    assert "rms[0].accuracy.math: must be in (0, 1), got 1.2" in run("--rms", str(spec))
    assert "'nope' is neither a preset" in run("--rms", "nope")
    assert "rho: must be in [0, 1], got 2" in run("--rho", "2")
    assert "duplicate id 'a-chat-0'" in run("--pairs", str(pairs))
    assert "unknown policy 'x'" in run("--policies", "x")
