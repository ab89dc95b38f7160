"""``reward-router router train`` / ``info`` end to end on files written here, tiny encoder."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from gateway.offline.cli import app
from gateway.offline.model import OfflineRouter

runner = CliRunner()


def write_data(folder: Path, n: int = 40) -> tuple[Path, Path]:
    """A pairs file (gzip) and a behaviour file: 'long-rm' is right on long answers."""
    rng = np.random.default_rng(0)
    pairs, lines = [], []
    for i in range(n):
        long_answer = i % 2 == 0
        chosen = "the answer is yes " * (12 if long_answer else 1)
        pairs.append(
            {
                "id": f"p{i}",
                "group": f"g{i // 2}",
                "domain": "chat",
                "prompt": [{"role": "user", "content": f"what is {i} + {i}?"}],
                "chosen": chosen,
                "rejected": "no " * (i % 5 + 1),
            }
        )
        ok = [float(long_answer), float(not long_answer), float(rng.random() < 0.5)]
        for rm, c in zip(["long-rm", "short-rm", "coin-rm"], ok, strict=True):
            lines.append({"pair_id": f"p{i}", "rm": rm, "correct": c})
    pairs_path = folder / "pairs.jsonl.gz"
    with gzip.open(pairs_path, "wt") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in pairs)
    behavior = folder / "behavior.jsonl"
    behavior.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return pairs_path, behavior


def train_args(pairs: Path, behavior: Path, out: Path, encoder: Path, cache: Path) -> list[str]:
    return [
        "train",
        "--pairs", str(pairs),
        "--behavior", str(behavior),
        "--out", str(out),
        "--encoder", str(encoder),
        "--cache-dir", str(cache),
        "--epochs", "30",
        "--hidden-sizes", "16",
        "--dim", "8",
        "--seed", "1",
    ]  # fmt: skip


def test_router_train_then_info(tmp_path: Path, llama_dir: Path) -> None:
    pairs, behavior = write_data(tmp_path)
    out = tmp_path / "router"
    args = train_args(pairs, behavior, out, llama_dir, tmp_path / "cache")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "router (argmax BT score)" in result.stdout
    assert "best single on these rows" in result.stdout
    assert "40 pairs with behaviour lines" in result.output

    router = OfflineRouter.load(out)
    assert router.rms == ["long-rm", "short-rm", "coin-rm"]
    assert router.encoder_ref == str(llama_dir.resolve())
    assert router.input_dim == 64 and router.dim == 9
    assert router.info["data"]["n_pairs"] == 40
    train = router.info["train"]
    assert train["n_train"] + train["n_valid"] + train["n_calib"] == 40
    # The embeddings were cached: the artifact's featurizer finds all of them on disk.
    fz = router.load_featurizer(tmp_path / "cache")
    assert len(fz.cache or []) == 80

    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0
    shown = json.loads(info.stdout)
    assert shown["rms"] == router.rms and shown["router"]["dim"] == 8


def test_bad_behaviour_line_exits_2_naming_line_and_field(tmp_path: Path, bert_dir: Path) -> None:
    pairs, behavior = write_data(tmp_path, n=6)
    rows = behavior.read_text().splitlines()
    rows[2] = json.dumps({"pair_id": "p0", "rm": "coin-rm", "correct": 2})
    behavior.write_text("\n".join(rows) + "\n")
    args = train_args(pairs, behavior, tmp_path / "out", bert_dir, tmp_path / "c")
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "behavior.jsonl:3" in result.stderr and "'correct'" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_bad_settings_exit_2_naming_the_field(tmp_path: Path, bert_dir: Path) -> None:
    pairs, behavior = write_data(tmp_path, n=6)
    base = train_args(pairs, behavior, tmp_path / "out", bert_dir, tmp_path / "c")
    for extra, field in [
        (["--dropout", "1.5"], "dropout"),
        (["--hidden-sizes", "16,x"], "hidden_sizes"),
        (["--valid-fraction", "0.99"], "valid_fraction"),
        (["--encoder", str(tmp_path / "missing")], "encoder"),
    ]:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, (extra, result.output)
        assert result.stderr.startswith(f"error: {field}:"), result.stderr
        assert "Traceback" not in result.output


def test_info_on_a_folder_that_is_not_an_artifact(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2
    assert "config.json" in result.stderr and "not found" in result.stderr
