"""The data loaders: the shipped files load, malformed files fail naming file, line and field."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from reward_router.data import load_behavior, load_pairs, prompt_text
from reward_router.errors import DataFormatError

DATA = Path(__file__).resolve().parents[1] / "data"


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _pair(pid: str, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {"id": pid, "prompt": "q", "chosen": "good", "rejected": "bad"}
    row.update(kw)
    return row


def test_shipped_judgebench_aligns_with_its_behaviour_file() -> None:
    pairs = load_pairs(DATA / "pairs" / "judgebench.jsonl.gz")
    matrix = load_behavior(DATA / "rm_outputs" / "judgebench.jsonl.gz", pairs)
    assert len(pairs) == 619
    assert matrix.correct.shape == (350, 6)
    assert matrix.skipped_pairs == 619 - 350
    # the README's published best single RM on this file: 0.773
    assert matrix.correct.mean(axis=0).max() == pytest.approx(0.773, abs=1e-3)
    assert np.isnan(matrix.margins).all()  # decisions only


def test_scores_become_margins(tmp_path: Path) -> None:
    pairs = _write(tmp_path / "p.jsonl", [_pair("a"), _pair("b")])
    beh = _write(
        tmp_path / "b.jsonl",
        [
            {"pair_id": "a", "rm": "x", "correct": 1, "score_chosen": 2.0, "score_rejected": 0.5},
            {"pair_id": "b", "rm": "x", "correct": "0.0", "score_chosen": 0, "score_rejected": 1},
        ],
    )
    m = load_behavior(beh, load_pairs(pairs))
    assert m.margins[:, 0].tolist() == [1.5, -1.0]
    assert m.correct[:, 0].tolist() == [1.0, 0.0]


def test_gzip_files_load(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl.gz"
    with gzip.open(p, "wt") as fh:
        fh.write(json.dumps(_pair("a", prompt=[{"role": "user", "content": "hi"}])) + "\n")
    assert prompt_text(load_pairs(p)[0].prompt) == "hi"


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        (["{not json"], "p.jsonl:1: invalid JSON"),
        ([_pair("a"), _pair("a")], "p.jsonl:2: field 'id': duplicate id"),
        ([{"id": "a", "prompt": "q", "chosen": "c"}], "p.jsonl:1: field 'rejected': missing"),
        ([_pair("a", chosen=3)], "field 'chosen': must be a string"),
        ([_pair("a", prompt=[{"role": "user"}])], "field 'prompt[0]'"),
    ],
)
def test_malformed_pairs_name_line_and_field(
    tmp_path: Path, rows: list[object], needle: str
) -> None:
    with pytest.raises(DataFormatError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_pairs(_write(tmp_path / "p.jsonl", rows))


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ([{"pair_id": "zzz", "rm": "x", "correct": 1}], "b.jsonl:1: field 'pair_id'"),
        ([{"pair_id": "a", "rm": "x", "correct": 0.7}], "field 'correct': must be 0, 0.5 or 1"),
        ([{"pair_id": "a", "rm": "x", "correct": "yes"}], "field 'correct': must be a number"),
        ([{"pair_id": "a", "rm": "x"}], "field 'correct': missing"),
        (
            [{"pair_id": "a", "rm": "x", "correct": 1, "score_chosen": 1}],
            "field 'score_rejected'",
        ),
        (
            [{"pair_id": "a", "rm": "x", "correct": 1}, {"pair_id": "a", "rm": "x", "correct": 0}],
            "b.jsonl:2: field 'rm': duplicate",
        ),
        (
            [
                {"pair_id": "a", "rm": "x", "correct": 1},
                {"pair_id": "b", "rm": "x", "correct": 1},
                {"pair_id": "a", "rm": "y", "correct": 1},
            ],
            "pair 'b' has no line for rm 'y'",
        ),
    ],
)
def test_malformed_behaviour_names_line_and_field(
    tmp_path: Path, rows: list[object], needle: str
) -> None:
    pairs = load_pairs(_write(tmp_path / "p.jsonl", [_pair("a"), _pair("b")]))
    with pytest.raises(DataFormatError, match=needle):
        load_behavior(_write(tmp_path / "b.jsonl", rows), pairs)
