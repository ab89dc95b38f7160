"""Train the small specialist reward models of the default pool (``reward-router rm train``).

Each specialist is all-MiniLM-L6-v2 with a one-output head, trained with the Bradley-Terry
loss ``-log sigmoid(r(chosen) - r(rejected))`` on one domain of the shipped pairs and saved as
a standard Hugging Face sequence-classification folder, which the ``hf`` backend serves.

Data per domain (``DOMAINS``), after dropping every pair whose normalised first user turn
appears in an evaluation-only file (so the eval columns of the docs table are not trained on):

* ``chat``: hh-rlhf helpful pairs;
* ``safety``: hh-rlhf harmless pairs + XSTest;
* ``math``: GSM8K correct vs incorrect model solutions.

The held-out split is by ``group`` (a stable hash, so ``reward-router rm heldout`` writes the
very same pairs for evaluation), and training uses a capped, seeded subset of the rest so each
specialist trains in minutes on a laptop CPU.

>>> train_specialist("chat", Path("artifacts/rms/chat"))   # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reward_router.data import Pair, first_user_turn, load_pairs
from reward_router.errors import ConfigError
from reward_router.models import minilm_path

#: domain -> (pairs file, domains kept from it)
DOMAINS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "chat": [("hh-rlhf.jsonl.gz", ("chat",))],
    "safety": [("hh-rlhf.jsonl.gz", ("safety",)), ("xstest.jsonl.gz", ("safety",))],
    "math": [("gsm8k-solutions.jsonl.gz", ("math",))],
}


def eval_prompt_keys(data_dir: Path) -> set[str]:
    """Normalised first user turns of every evaluation-only pairs file."""
    keys: set[str] = set()
    for path in sorted(data_dir.glob("*.jsonl.gz")):
        pairs = load_pairs(path)
        if all(p.use == "eval" for p in pairs):
            keys.update(first_user_turn(p.prompt) for p in pairs)
    return keys


def in_heldout(group: str, fraction: float) -> bool:
    """Stable group-level split: the same group is always on the same side."""
    digest = hashlib.sha256(group.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def domain_split(
    domain: str, data_dir: Path, heldout_fraction: float = 0.2
) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) pairs of a domain, eval prompts filtered out, split by group."""
    if domain not in DOMAINS:
        raise ConfigError("domain", f"must be one of {sorted(DOMAINS)}, got {domain!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError("heldout_fraction", f"must be in (0, 1), got {heldout_fraction}")
    banned = eval_prompt_keys(data_dir)
    train: list[Pair] = []
    held: list[Pair] = []
    for name, keep in DOMAINS[domain]:
        for p in load_pairs(data_dir / name):
            if p.domain not in keep or first_user_turn(p.prompt) in banned:
                continue
            (held if in_heldout(p.group, heldout_fraction) else train).append(p)
    return train, held


def write_pairs(pairs: Sequence[Pair], path: Path) -> None:
    """Write pairs in the data/README.md format (gzip when the name ends in .gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for p in pairs:
            row = {
                "id": p.id,
                "source": p.source,
                "domain": p.domain,
                "subset": p.subset,
                "group": p.group,
                "prompt": p.prompt,
                "chosen": p.chosen,
                "rejected": p.rejected,
                "meta": p.meta,
                "use": p.use,
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass
class TrainConfig:
    """Caps that keep a specialist's training to minutes on a CPU (documented in the docs)."""

    max_pairs: int = 2000
    epochs: int = 1
    batch_size: int = 16
    lr: float = 5e-5
    max_length: int = 256
    heldout_fraction: float = 0.2
    max_eval_pairs: int = 600
    # Embeddings and the lowest encoder layers stay frozen: ~2x faster steps on a CPU, and
    # with a few thousand pairs the general-purpose lower layers are not what needs to move.
    freeze_layers: int = 2
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_pairs": self.max_pairs >= 1,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "max_length": self.max_length >= 16,
            "max_eval_pairs": self.max_eval_pairs >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(name, f"out of range: {getattr(self, name)!r}")


def _freeze_lower(model: Any, n_layers: int) -> None:
    """Freeze the embeddings and the ``n_layers`` lowest encoder layers (BERT-style models)."""
    if n_layers < 0:
        return
    base = model.base_model
    base.embeddings.requires_grad_(False)
    for layer in base.encoder.layer[:n_layers]:
        layer.requires_grad_(False)


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def train_specialist(
    domain: str,
    out: Path,
    config: TrainConfig | None = None,
    *,
    data_dir: Path = Path("data/pairs"),
    base_model: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one specialist and save it to ``out``; returns a report with held-out accuracy."""
    import torch
    import torch.nn.functional as F
    from rich.progress import Progress
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from services.backends.hf import encode_batch

    cfg = config or TrainConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    train, held = domain_split(domain, data_dir, cfg.heldout_fraction)
    rng.shuffle(train)
    train = train[: cfg.max_pairs]
    held_eval = rng.sample(held, min(len(held), cfg.max_eval_pairs))
    base = base_model or minilm_path()
    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    # The new one-output head is meant to be freshly initialised; silence the notice about it.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=1, trust_remote_code=False, use_safetensors=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    _freeze_lower(model, cfg.freeze_layers)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )

    def rewards(batch: Sequence[Pair]) -> tuple[Any, Any]:
        prompts = [p.prompt for p in batch] * 2
        responses = [p.chosen for p in batch] + [p.rejected for p in batch]
        enc, _ = encode_batch(tok, prompts, responses, cfg.max_length)
        r = model(**enc).logits[:, 0]
        return r[: len(batch)], r[len(batch) :]

    def accuracy(pairs: Sequence[Pair]) -> float:
        model.eval()
        right = 0.0
        with torch.inference_mode():
            for rg in _batches(len(pairs), 32):
                rc, rr = rewards([pairs[i] for i in rg])
                right += float((rc > rr).sum()) + 0.5 * float((rc == rr).sum())
        model.train()
        return right / max(1, len(pairs))

    log: list[dict[str, float]] = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"train {domain}", total=steps)
        step = 0
        for epoch in range(cfg.epochs):
            rng.shuffle(train)
            total = 0.0
            for rg in _batches(len(train), cfg.batch_size):
                rc, rr = rewards([train[i] for i in rg])
                loss = -F.logsigmoid(rc - rr).mean()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(rg)
                step += 1
                bar.update(
                    task, advance=1, description=f"train {domain} loss {float(loss.detach()):.3f}"
                )
            log.append({"epoch": epoch + 1, "train_loss": total / max(1, len(train))})
        acc = accuracy(held_eval)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    report = {
        "domain": domain,
        "base_model": str(base),
        "train_pairs": len(train),
        "heldout_pairs": len(held),
        "heldout_evaluated": len(held_eval),
        "heldout_accuracy": acc,
        "config": asdict(cfg),
        "epochs": log,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
