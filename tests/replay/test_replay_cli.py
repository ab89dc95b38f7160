"""``reward-router replay`` end to end: files in, table + JSON + PNG out, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from reward_router_cli.main import app
from tests.tiny_models import tiny_bert


def _write_files(tmp: Path, n: int = 40) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    pairs, lines = [], []
    for i in range(n):
        domain = "math" if i % 2 else "chat"
        pairs.append(
            {
                "id": f"p{i}",
                "domain": domain,
                "group": f"g{i}",
                "prompt": [{"role": "user", "content": f"{domain} question {i}"}],
                "chosen": f"good answer {i}",
                "rejected": f"bad answer {i}",
            }
        )
        for rm, p in (("math-rm", 0.9 if domain == "math" else 0.4), ("chat-rm", 0.6)):
            lines.append({"pair_id": f"p{i}", "rm": rm, "correct": float(rng.random() < p)})
    (tmp / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    (tmp / "beh.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp / "pairs.jsonl", tmp / "beh.jsonl"


def test_replay_cli_writes_json_and_plot(tmp_path: Path) -> None:
    pairs, beh = _write_files(tmp_path)
    encoder = tiny_bert(tmp_path / "enc")
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    args = [
        "replay", "--pairs", str(pairs), "--behavior", str(beh), "--folds", "2", "--seeds", "1",
        "--encoder", str(encoder), "--cache-dir", str(tmp_path / "cache"),
        "--set", "router.epochs=5", "--json", str(out), "--plot", str(png),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["pairs"] == 40 and data["rms"] == ["math-rm", "chat-rm"]
    assert data["policies"]["majority"]["rm_calls_per_pair"] == 2.0
    assert set(data["policies"]["bayesian"]["by_domain"]) == {"chat", "math"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best-single" in result.output
    # the second run finds every embedding in the cache
    assert any((tmp_path / "cache").rglob("*"))


def test_replay_cli_bad_input_names_the_problem(tmp_path: Path) -> None:
    pairs, beh = _write_files(tmp_path, n=4)
    beh.write_text(beh.read_text() + '{"pair_id": "p0", "rm": "x", "correct": 2}\n')
    result = CliRunner().invoke(app, ["replay", "--pairs", str(pairs), "--behavior", str(beh)])
    assert result.exit_code == 2
    assert "beh.jsonl:9: field 'correct': must be 0, 0.5 or 1" in result.output
    result = CliRunner().invoke(
        app, ["replay", "--pairs", str(pairs), "--behavior", str(beh), "--policies", "nope"]
    )
    assert result.exit_code == 2 and "unknown policy 'nope'" in result.output
