"""``reward-router router ...``: train and inspect the offline router.

    reward-router router train --pairs data/pairs/judgebench.jsonl.gz \\
        --behavior data/rm_outputs/judgebench.jsonl.gz --out artifacts/router-judgebench
    reward-router router info artifacts/router-judgebench

Torch and transformers are imported inside the commands so ``--help`` stays fast. Errors a
user can cause (a bad file, a bad setting, a model that cannot be found) print one line naming
the file / field and exit with code 2.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from reward_router.errors import ConfigError, RewardRouterError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _parse_sizes(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError as exc:
        raise ConfigError(
            "hidden_sizes", f"must be comma-separated integers, got {text!r}"
        ) from exc


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


@app.command()
def train(
    pairs: Annotated[Path, typer.Option(help="Pairs file (JSONL or JSONL.gz, data/README.md).")],
    behavior: Annotated[Path, typer.Option(help="Behaviour file: per-RM correctness per pair.")],
    out: Annotated[Path, typer.Option(help="Folder to write the router artifact into.")],
    encoder: Annotated[
        str, typer.Option(help="minilm | smollm2 | a local Hugging Face folder.")
    ] = "minilm",
    max_length: Annotated[int, typer.Option(help="Token window per (prompt, response).")] = 256,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Embedding cache [default: $REWARD_ROUTER_CACHE/embeddings]."),
    ] = None,
    no_cache: Annotated[bool, typer.Option(help="Do not read or write embeddings.")] = False,
    device: Annotated[str, typer.Option(help="Torch device for encoding.")] = "cpu",
    encode_batch_size: Annotated[int, typer.Option(help="Texts per encoder batch.")] = 32,
    epochs: Annotated[int, typer.Option(help="Maximum training epochs.")] = 300,
    patience: Annotated[int, typer.Option(help="Early-stopping patience (0 = off).")] = 60,
    hidden_sizes: Annotated[str, typer.Option(help="MLP hidden widths, comma-separated.")] = "256",
    dim: Annotated[int, typer.Option(help="d, the size of h (context is d+1).")] = 64,
    lambda_cls: Annotated[float, typer.Option(help="Weight of the classification loss.")] = 1.0,
    dropout: Annotated[float, typer.Option(help="Dropout after hidden layers.")] = 0.2,
    input_dropout: Annotated[float, typer.Option(help="Dropout on the input features.")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.01,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Pairs per training step.")] = 64,
    valid_fraction: Annotated[
        float, typer.Option(help="Share of prompt groups held out for checkpoint selection.")
    ] = 0.2,
    select_margin: Annotated[
        float,
        typer.Option(
            help="A checkpoint must beat the training-best RM on held-out rows by this many "
            "standard errors to be kept (0 = any gain)."
        ),
    ] = 1.0,
    finetune_encoder: Annotated[
        bool,
        typer.Option(
            help="Fine-tune the encoder with the router (slow on CPU: meant for --device cuda); "
            "the artifact then holds the encoder."
        ),
    ] = False,
    encoder_lr: Annotated[
        float, typer.Option(help="Encoder learning rate when fine-tuning.")
    ] = 2e-5,
    seed: Annotated[int, typer.Option(help="Seed of split, init and shuffling.")] = 0,
    threads: Annotated[int, typer.Option(help="Torch threads for the MLP.")] = 1,
) -> None:
    """Train an offline router from a pairs file and a behaviour file."""
    try:
        _train(**locals())
    except RewardRouterError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"{getattr(exc, 'filename', '') or ''} {exc.strerror or exc}".strip()) from None


def _train(**opt: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from gateway.offline.model import RouterConfig
    from reward_router.data import load_behavior, load_pairs
    from reward_router.models import resolve_model_ref

    console = Console(stderr=True)
    # Validate every setting before any slow work (loading data, models, encoding).
    cfg = RouterConfig(
        hidden_sizes=_parse_sizes(opt["hidden_sizes"]),
        dim=opt["dim"],
        lambda_cls=opt["lambda_cls"],
        dropout=opt["dropout"],
        input_dropout=opt["input_dropout"],
        weight_decay=opt["weight_decay"],
        lr=opt["lr"],
        epochs=opt["epochs"],
        patience=opt["patience"],
        batch_size=opt["batch_size"],
        seed=opt["seed"],
        num_threads=opt["threads"],
        select_margin=opt["select_margin"],
    )
    if not 0.0 <= opt["valid_fraction"] <= 0.9:
        raise ConfigError("valid_fraction", f"must be in [0, 0.9], got {opt['valid_fraction']}")
    if opt["finetune_encoder"] and not 0.0 < opt["encoder_lr"] <= 1.0:
        raise ConfigError("encoder_lr", f"must be in (0, 1], got {opt['encoder_lr']}")
    resolve_model_ref(opt["encoder"])
    pairs = load_pairs(opt["pairs"])
    matrix = load_behavior(opt["behavior"], pairs)
    console.print(
        f"{matrix.n_pairs} pairs with behaviour lines ({matrix.skipped_pairs} skipped), "
        f"{matrix.n_rms} RMs"
    )

    import numpy as np

    from gateway.features import PairFeaturizer, load_encoder
    from gateway.offline.train import train_router
    from reward_router.models import cache_root

    cache = None if opt["no_cache"] else (opt["cache_dir"] or cache_root() / "embeddings")
    prompts = [p.prompt for p in matrix.pairs]
    chosen = [p.chosen for p in matrix.pairs]
    rejected = [p.rejected for p in matrix.pairs]
    groups = [p.group for p in matrix.pairs]
    domains = [p.domain for p in matrix.pairs]
    if opt["finetune_encoder"]:
        from gateway.offline.finetune import finetune_router

        console.print(f"fine-tuning {opt['encoder']} on {opt['device']} with the router")
        router, report = finetune_router(
            prompts,
            chosen,
            rejected,
            matrix.correct,
            matrix.rms,
            cfg,
            encoder_ref=opt["encoder"],
            max_length=opt["max_length"],
            device=opt["device"],
            encoder_lr=opt["encoder_lr"],
            encode_batch_size=opt["encode_batch_size"],
            groups=groups,
            valid_fraction=opt["valid_fraction"],
            cache_dir=cache,
            progress=True,
            domains=domains,
        )
        feats = router.load_featurizer(cache).featurize(prompts, chosen, rejected)
    else:
        t0 = time.perf_counter()
        enc = load_encoder(
            opt["encoder"],
            max_length=opt["max_length"],
            device=opt["device"],
            batch_size=opt["encode_batch_size"],
        )
        t1 = time.perf_counter()
        feats = PairFeaturizer(enc, cache).featurize(prompts, chosen, rejected)
        t2 = time.perf_counter()
        console.print(
            f"features {feats.shape} from {enc.ref} (max_length {enc.max_length}): "
            f"load {t1 - t0:.1f}s, featurize {t2 - t1:.1f}s"
        )
        router, report = train_router(
            feats,
            matrix.correct,
            matrix.rms,
            cfg,
            groups=groups,
            valid_fraction=opt["valid_fraction"],
            encoder_ref=enc.ref,
            max_length=enc.max_length,
            progress=True,
            domains=domains,
        )
    router.info["data"] = {
        "pairs": str(opt["pairs"]),
        "behavior": str(opt["behavior"]),
        "n_pairs": matrix.n_pairs,
    }
    router.save(opt["out"])

    table = Table(title=f"offline router -> {opt['out']}")
    table.add_column("held-out rows", justify="left")
    table.add_column("accuracy", justify="right")
    table.add_row("router (argmax BT score)", _fmt(report.valid_routing_acc))
    table.add_row(
        f"best single on these rows ({report.valid_best_single_rm})",
        _fmt(report.valid_best_single_acc),
    )
    table.add_row(f"training-best RM ({report.train_best_rm})", _fmt(report.valid_train_best_acc))
    table.add_row("oracle (any RM right)", _fmt(report.valid_oracle_acc))
    Console().print(table)
    share = np.bincount(router.route(feats), minlength=router.n_rms) / len(feats)
    picks = ", ".join(f"{rm} {s:.0%}" for rm, s in zip(router.rms, share, strict=True) if s > 0)
    typer.echo(
        f"train {report.n_train} / held-out {report.n_valid} pairs; best epoch "
        f"{report.best_epoch} of {report.epochs_run}; training {report.seconds:.1f}s; "
        f"routes to: {picks}"
    )
    if report.n_valid and report.best_epoch == 0:
        typer.echo(
            f"note: no checkpoint beat the training-best RM ({report.train_best_rm}) on the "
            f"held-out rows by {cfg.select_margin} standard errors; the router starts as that "
            "RM (zero E_bt, per-RM biases) and leaves routing to the online phase."
        )
    elif report.n_valid and not report.beats_best_single:
        typer.echo(
            "note: the router does not beat the best single RM on the held-out rows "
            "(held-out accuracy is also what picked the checkpoint, so it is optimistic)."
        )


@app.command()
def info(directory: Annotated[Path, typer.Argument(help="A router artifact folder.")]) -> None:
    """Print a router artifact's config.json (encoder, RMs, settings, training summary)."""
    from gateway.offline.model import read_artifact_config

    try:
        cfg = read_artifact_config(directory)
    except RewardRouterError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(cfg, indent=2))
