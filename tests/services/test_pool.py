"""Training a specialist (on a tiny model and tiny data) and collecting a pool's behaviour."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from reward_router.data import first_user_turn, load_behavior, load_pairs
from reward_router.errors import ConfigError
from services.backends import ScoreInput, make_backend
from services.cli import app as rm_cli
from services.pool import accuracy_table, load_pool, markdown_table
from services.settings import load_settings
from services.train import (
    TrainConfig,
    domain_split,
    merge_adapter,
    probe_scores,
    train_specialist,
)
from tests.services.conftest import rm_services, write_config
from tests.tiny_models import tiny_bert


def _pair(i: int, domain: str, use: str = "train-or-eval", **kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": f"{domain}-{use}-{i}",
        "source": "test",
        "domain": domain,
        "group": f"g-{domain}-{i}",
        "prompt": [{"role": "user", "content": f"question {i} about {domain}"}],
        "chosen": "good helpful answer " * (1 + i % 3),
        "rejected": "bad",
        "use": use,
    }
    row.update(kw)
    return row


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    with gzip.open(path, "wt") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    hh = [_pair(i, "chat") for i in range(40)] + [_pair(i, "safety") for i in range(20)]
    _write(d / "hh-rlhf.jsonl.gz", hh)
    _write(d / "xstest.jsonl.gz", [_pair(100 + i, "safety") for i in range(10)])
    _write(d / "gsm8k-solutions.jsonl.gz", [_pair(i, "math") for i in range(10)])
    # An eval-only file sharing two prompts with the training data: they must be dropped.
    _write(d / "evalset.jsonl.gz", [_pair(3, "chat", use="eval"), _pair(7, "chat", use="eval")])
    return d


def test_domain_split_filters_eval_prompts_and_splits_by_group(data_dir: Path) -> None:
    train, held = domain_split("chat", data_dir, heldout_fraction=0.3)
    assert len(train) + len(held) == 38  # 40 chat pairs minus the 2 eval prompts
    keys = {first_user_turn(p.prompt) for p in train + held}
    assert "question 3 about chat" not in keys and "question 7 about chat" not in keys
    assert {p.group for p in train}.isdisjoint({p.group for p in held})
    assert held and train
    assert domain_split("chat", data_dir, heldout_fraction=0.3)[1] == held  # stable
    safety_train, safety_held = domain_split("safety", data_dir)
    assert len(safety_train) + len(safety_held) == 30  # hh-rlhf harmless + xstest


def test_train_specialist_saves_a_servable_rm(tmp_path: Path, data_dir: Path) -> None:
    base = tiny_bert(tmp_path / "base")
    out = tmp_path / "rm"
    # LoRA in the upper one of the tiny model's two layers: the lower one's outputs are cached.
    cfg = TrainConfig(
        max_pairs=16, batch_size=8, max_length=64, epochs=2, threads=1, freeze_layers=1
    )
    report = train_specialist("chat", out, cfg, data_dir=data_dir, base_model=base, progress=False)
    assert report["train_pairs"] == 16
    # The adapter (what ships) is small and, merged again, gives the scores the report recorded.
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size < 100_000
    rebuilt = merge_adapter(out / "adapter", tmp_path / "rebuilt", base)
    again = probe_scores(rebuilt, domain_split("chat", data_dir)[1], 64)["scores"]
    for pair_id, (chosen, rejected) in report["probe"]["scores"].items():
        assert again[pair_id] == pytest.approx([chosen, rejected], abs=1e-5)
    assert 0.0 <= report["heldout_accuracy"] <= 1.0
    assert json.loads((out / "train_report.json").read_text())["domain"] == "chat"
    rm = make_backend(load_settings(None, name="chat-rm", backend="hf", model=str(out)))
    rm.load()
    prompt = [{"role": "user", "content": "question 1 about chat"}]
    scores = rm.score_batch([ScoreInput(prompt, "good helpful answer"), ScoreInput(prompt, "bad")])
    assert all(np.isfinite(s.score) for s in scores)
    # Two epochs on "chosen is the long, 'good' answer" separate the two sides.
    assert scores[0].score > scores[1].score


@pytest.mark.parametrize("lora_rank", [8, 0])
def test_a_mean_pooled_head_is_served_as_it_was_trained(
    tmp_path: Path, data_dir: Path, lora_rank: int
) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    base = tiny_bert(tmp_path / "base")
    out = tmp_path / "rm"
    cfg = TrainConfig(
        max_pairs=16,
        batch_size=8,
        max_length=64,
        epochs=2,
        threads=1,
        freeze_layers=1,
        lora_rank=lora_rank,
        pooling="mean",
    )
    report = train_specialist("chat", out, cfg, data_dir=data_dir, base_model=base, progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.reward_pooling == "mean"
    rm = make_backend(load_settings(None, name="chat-rm", backend="hf", model=str(out)))
    rm.load()
    prompt = [{"role": "user", "content": "question 1 about chat"}]
    items = [ScoreInput(prompt, "good helpful answer"), ScoreInput(prompt, "bad")]
    served = [s.score for s in rm.score_batch(items)]
    assert served[0] > served[1]
    # The service reads the mean of the hidden states, not the folder's own [CLS] forward.
    enc = rm.tokenizer(
        ["question 1 about chat"] * 2,
        ["good helpful answer", "bad"],
        return_tensors="pt",
        padding=True,
    )
    with torch.inference_mode():
        cls = model(**enc).logits[:, 0].tolist()
    assert served != pytest.approx(cls, abs=1e-4)
    if lora_rank:
        # The merged folder rebuilt from the shipped adapter keeps the pooling and the scores.
        rebuilt = merge_adapter(out / "adapter", tmp_path / "rebuilt", base)
        again = probe_scores(rebuilt, domain_split("chat", data_dir)[1], 64)["scores"]
        for pair_id, (chosen, rejected) in report["probe"]["scores"].items():
            assert again[pair_id] == pytest.approx([chosen, rejected], abs=1e-5)


def test_a_specialist_can_keep_only_the_lower_layers(tmp_path: Path, data_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    base = tiny_bert(tmp_path / "base")  # two layers
    cfg = TrainConfig(
        max_pairs=16, batch_size=8, max_length=64, epochs=2, threads=1, freeze_layers=1,
        layers=1, pooling="mean",
    )  # fmt: skip
    out = tmp_path / "rm"
    report = train_specialist("chat", out, cfg, data_dir=data_dir, base_model=base, progress=False)
    served = AutoModelForSequenceClassification.from_pretrained(out)
    assert served.config.num_hidden_layers == 1 and len(served.bert.encoder.layer) == 1
    # Rebuilt from the adapter alone (as `rm build` does), it is the same one-layer model.
    rebuilt = merge_adapter(out / "adapter", tmp_path / "rebuilt", base)
    assert AutoModelForSequenceClassification.from_pretrained(rebuilt).config.num_hidden_layers == 1
    again = probe_scores(rebuilt, domain_split("chat", data_dir)[1], 64)["scores"]
    for pair_id, (chosen, rejected) in report["probe"]["scores"].items():
        assert again[pair_id] == pytest.approx([chosen, rejected], abs=1e-5)
    with pytest.raises(ConfigError, match="layers"):
        train_specialist(
            "chat", tmp_path / "x", TrainConfig(layers=3), data_dir=data_dir, base_model=base
        )


def test_an_unknown_pooling_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pooling"):
        TrainConfig(pooling="max")
    folder = tiny_bert(tmp_path / "bad", seq_cls=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "reward_pooling": "max"}))
    rm = make_backend(load_settings(None, name="bad", backend="hf", model=str(tmp_path / "bad")))
    with pytest.raises(ConfigError, match="reward_pooling"):
        rm.load()


def test_eval_every_epoch_logs_held_out_accuracy_and_leaves_training_unchanged(
    tmp_path: Path, data_dir: Path
) -> None:
    base = tiny_bert(tmp_path / "base")
    common = {"max_pairs": 16, "batch_size": 8, "max_length": 64, "epochs": 3, "threads": 1}
    plain = train_specialist(
        "chat",
        tmp_path / "a",
        TrainConfig(**common, freeze_layers=1),
        data_dir=data_dir,
        base_model=base,
        progress=False,
    )
    each = train_specialist(
        "chat",
        tmp_path / "b",
        TrainConfig(**common, freeze_layers=1, eval_every_epoch=True),
        data_dir=data_dir,
        base_model=base,
        progress=False,
    )
    # Epochs 1 and 2 are scored on the held-out sample; the last one is the report's figure.
    assert [("heldout_accuracy" in e) for e in each["epochs"]] == [True, True, False]
    assert all(0.0 <= e["heldout_accuracy"] <= 1.0 for e in each["epochs"][:2])
    assert "heldout_accuracy" not in plain["epochs"][0]
    # Scoring in between (from the cached frozen-layer outputs) changes nothing of the training.
    assert [e["train_loss"] for e in each["epochs"]] == pytest.approx(
        [e["train_loss"] for e in plain["epochs"]], abs=1e-6
    )
    assert each["heldout_accuracy"] == plain["heldout_accuracy"]
    for pair_id, scores in plain["probe"]["scores"].items():
        assert each["probe"]["scores"][pair_id] == pytest.approx(scores, abs=1e-5)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Iterator[Path]:
    """A pool of three real services: verifier, length and a tiny-Llama judge."""
    d = tmp_path_factory.mktemp("pool")
    write_config(d / "verifier.yaml", name="verifier", backend="verifier")
    write_config(d / "length.yaml", name="length", backend="length", max_request_items=3)
    write_config(
        d / "judge.yaml", name="judge", backend="judge", model=str(llama_dir), max_length=256
    )
    (d / "pool.yaml").write_text(
        yaml.safe_dump(
            {"rms": [{"config": f} for f in ("verifier.yaml", "length.yaml", "judge.yaml")]}
        )
    )
    names = ("verifier.yaml", "length.yaml", "judge.yaml")
    with rm_services(*((d / n, "/readyz") for n in names)):
        yield d / "pool.yaml"


def test_judge_service_compares_natively(pool: Path) -> None:
    import httpx

    judge = next(m for m in load_pool(pool) if m.name == "judge")
    info = httpx.get(judge.url + "/v1/info").json()
    assert info["pairwise"] is True and info["backend"] == "judge"
    body = {
        "pairs": [
            {"prompt": "q", "response_a": "yes", "response_b": "no"},
            {"prompt": "q", "response_a": "no", "response_b": "yes"},
        ]
    }
    res = httpx.post(judge.url + "/v1/compare", json=body).json()["results"]
    assert res[0]["score_a"] == pytest.approx(res[1]["score_b"], abs=1e-5)
    assert res[0]["score_a"] + res[0]["score_b"] == pytest.approx(1.0)


def test_collect_writes_a_behavior_file(pool: Path, tmp_path: Path) -> None:
    rows = [
        _pair(
            0,
            "math",
            meta={"ground_truth": "so 2 + 2 = 4\nA: 4"},
            chosen="it is 4",
            rejected="it is 5, as one can show by a long argument",
        ),
        _pair(
            1,
            "math",
            meta={"ground_truth": "#### 10"},
            chosen="the total is 10 apples",
            rejected="7",
        ),
        _pair(2, "chat", chosen="yes", rejected="no, never"),
        _pair(3, "chat"),
        _pair(4, "chat"),
    ]
    pairs_file = _write(tmp_path / "pairs.jsonl.gz", rows)
    out = tmp_path / "behavior.jsonl.gz"
    result = CliRunner().invoke(
        rm_cli,
        ["collect", "--pairs", str(pairs_file), "--rms", str(pool), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    pairs = load_pairs(pairs_file)
    matrix = load_behavior(out, pairs)
    assert matrix.rms == ["verifier", "length", "judge"] and matrix.n_pairs == 5
    verifier, length = matrix.correct[:, 0], matrix.correct[:, 1]
    assert verifier.tolist() == [1.0, 1.0, 0.5, 0.5, 0.5]  # abstains (tie) without reference
    assert length.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]  # prefers whichever is longer
    assert np.isfinite(matrix.margins).all()
    _, table = accuracy_table(pairs, out, by="domain")
    assert table["math"]["verifier"] == (1.0, 2)
    assert table["chat"]["length"] == (pytest.approx(2 / 3), 3)


def test_markdown_table_marks_best_and_smaller_samples() -> None:
    columns = {
        "chat": {"a": (0.7, 200), "b": (0.6, 200), "judge": (0.55, 20)},
        "math": {"a": (0.5, 100), "b": (0.9, 100), "judge": (0.9, 20)},
    }
    lines = markdown_table(columns, ["a", "b", "judge"]).splitlines()
    assert lines[0] == "| RM | chat (n=200) | math (n=100) |"
    assert lines[2] == "| a | **0.700** | 0.500 |"
    assert lines[3] == "| b | 0.600 | **0.900** |"
    assert lines[4] == "| judge | 0.550 (n=20) | **0.900** (n=20) |"


def test_pool_file_errors_name_the_entry(tmp_path: Path) -> None:
    write_config(tmp_path / "len.yaml", name="length", backend="length")
    (tmp_path / "pool.yaml").write_text(
        yaml.safe_dump({"rms": [{"config": "len.yaml", "eval_limit": 0}]})
    )
    with pytest.raises(ConfigError) as info:
        load_pool(tmp_path / "pool.yaml")
    assert info.value.field == "rms[0].eval_limit"
    (tmp_path / "pool.yaml").write_text(
        yaml.safe_dump({"rms": [{"config": "len.yaml"}, {"config": "len.yaml"}]})
    )
    with pytest.raises(ConfigError, match="unique"):
        load_pool(tmp_path / "pool.yaml")


def test_matrix_summary_best_single_per_domain_majority_oracle(tmp_path: Path) -> None:
    from services.pool import matrix_summary

    rows = [_pair(i, "chat") for i in range(4)] + [_pair(i, "math") for i in range(4)]
    pairs_file = _write(tmp_path / "p.jsonl.gz", rows)
    # a: right on chat only; b: right on math only; c: right on the first pair only.
    lines = []
    for r in rows:
        chat = r["domain"] == "chat"
        lines += [
            {"pair_id": r["id"], "rm": "a", "correct": 1.0 if chat else 0.0},
            {"pair_id": r["id"], "rm": "b", "correct": 0.0 if chat else 1.0},
            {
                "pair_id": r["id"],
                "rm": "c",
                "correct": 1.0 if r["id"] == "chat-train-or-eval-0" else 0.5,
            },
        ]
    behavior = _write(tmp_path / "b.jsonl.gz", lines)
    s = matrix_summary(load_pairs(pairs_file), behavior)
    assert s["pairs"] == 8
    assert s["best_single"][:2] == ("c", pytest.approx(4.5 / 8))
    best_in, acc, se = s["best_per_domain"]
    assert best_in == {"chat": "a", "math": "b"} and acc == 1.0 and se == 0.0
    assert s["majority"][0] == pytest.approx((1 + 7 * 0.5) / 8)  # one vote each way but pair 0
    assert s["oracle"][0] == 1.0
