"""The speed benchmark runs end to end and writes the agreed JSON (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_quick_run_writes_the_agreed_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    script = ROOT / "benchmarks" / "bench_routing_core.py"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=240,
    )
    data = json.loads(out.read_text())
    assert list(data) == ["results"]
    rates = ("decisions_per_s", "naive_decisions_per_s", "updates_per_s")
    keys = {"n_rms", "dim", *rates}
    assert [(r["n_rms"], r["dim"]) for r in data["results"]] == [
        (n, d) for n in (4, 16, 64) for d in (64, 384, 576)
    ]
    for row in data["results"]:
        assert set(row) == keys
        assert isinstance(row["n_rms"], int) and isinstance(row["dim"], int)
        assert all(row[k] > 0 for k in rates)
