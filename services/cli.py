"""``reward-router rm ...``: serve one RM, train the small specialists, run a pool.

Heavy libraries (torch, transformers, uvicorn) are imported inside the commands so that
``reward-router --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from reward_router.errors import RewardRouterError
from services.train import TrainConfig

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
_TRAIN = TrainConfig()  # the defaults of `rm train`


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


@app.command()
def serve(
    config: Path | None = typer.Option(None, help="YAML settings file (see docs/services.md)."),
    host: str | None = typer.Option(None, help="Override the bind address."),
    port: int | None = typer.Option(None, help="Override the port."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve one reward model over HTTP (/v1/score, /v1/compare, /v1/info, /metrics)."""
    import uvicorn

    from reward_router.http import header_timeout_protocol
    from services.app import create_app
    from services.settings import load_settings

    try:
        settings = load_settings(config, host=host, port=port)
    except RewardRouterError as exc:
        raise _fail(exc) from exc
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        # Keep-alive longer than a client's pool idle time avoids resets on reused sockets.
        timeout_keep_alive=30,
        http=header_timeout_protocol(settings.header_timeout_s),
    )


@app.command()
def train(
    domain: str = typer.Option(..., help="chat | safety | math"),
    out: Path = typer.Option(..., help="Output folder (a Hugging Face model folder)."),
    max_pairs: int = typer.Option(_TRAIN.max_pairs, help="Cap on training pairs (seeded subset)."),
    epochs: int = typer.Option(_TRAIN.epochs, help="Passes over the training pairs."),
    batch_size: int = typer.Option(_TRAIN.batch_size, help="Pairs per step."),
    lr: float = typer.Option(_TRAIN.lr, help="AdamW learning rate."),
    max_length: int = typer.Option(_TRAIN.max_length, help="Tokens per (prompt, response)."),
    max_eval_pairs: int = typer.Option(
        _TRAIN.max_eval_pairs, help="Held-out pairs scored at the end."
    ),
    lora_rank: int = typer.Option(
        _TRAIN.lora_rank, help="LoRA rank (0: plain fine-tuning above --freeze-layers)."
    ),
    freeze_layers: int = typer.Option(
        _TRAIN.freeze_layers, help="Plain fine-tuning: frozen lowest encoder layers (-1: none)."
    ),
    pooling: str = typer.Option(
        _TRAIN.pooling, help="How the head reads the encoder: cls (BERT's pooler) or mean."
    ),
    layers: int | None = typer.Option(
        None, help="Keep only the base's lowest N encoder layers [default: all]."
    ),
    threads: int | None = typer.Option(None, help="torch threads."),
    eval_every_epoch: bool = typer.Option(
        False, help="Also score the held-out sample after every epoch (in the report)."
    ),
    seed: int = typer.Option(0),
    data_dir: Path = typer.Option(Path("data/pairs"), help="Folder of the shipped pairs."),
    base_model: Path | None = typer.Option(
        None, help="A local Hugging Face encoder folder to start from [default: all-MiniLM-L6-v2]."
    ),
) -> None:
    """Train a MiniLM-L6 specialist RM on one domain; prints its held-out accuracy."""
    from services.train import TrainConfig, train_specialist

    try:
        cfg = TrainConfig(
            max_pairs=max_pairs,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            max_length=max_length,
            max_eval_pairs=max_eval_pairs,
            lora_rank=lora_rank,
            freeze_layers=freeze_layers,
            pooling=pooling,
            layers=layers,
            seed=seed,
            threads=threads,
            eval_every_epoch=eval_every_epoch,
        )
        report = train_specialist(domain, out, cfg, data_dir=data_dir, base_model=base_model)
    except RewardRouterError as exc:
        raise _fail(exc) from exc
    typer.echo(
        f"{domain}: trained on {report['train_pairs']} pairs; held-out accuracy "
        f"{report['heldout_accuracy']:.3f} on {report['heldout_evaluated']} pairs -> {out}"
    )


@app.command()
def heldout(
    domain: str = typer.Option(..., help="chat | safety | math | pool"),
    out: Path = typer.Option(..., help="Pairs file to write (.jsonl or .jsonl.gz)."),
    limit: int | None = typer.Option(None, help="Seeded sample of at most this many pairs."),
    seed: int = typer.Option(0),
    data_dir: Path = typer.Option(Path("data/pairs")),
) -> None:
    """Write the held-out pairs of a domain (never trained on) for evaluation; ``--domain
    pool``: the pairs of the pool's behaviour matrix (every domain's + hhh-alignment)."""
    import random

    from services.train import domain_split, pool_heldout, write_pairs

    try:
        held = pool_heldout(data_dir) if domain == "pool" else domain_split(domain, data_dir)[1]
    except RewardRouterError as exc:
        raise _fail(exc) from exc
    if limit is not None and limit < len(held):
        held = random.Random(seed).sample(held, limit)
    write_pairs(held, out)
    typer.echo(json.dumps({"domain": domain, "pairs": len(held), "out": str(out)}))


@app.command()
def build(
    out: Path = typer.Option(Path("artifacts/rms"), help="Folder for <domain>/ model folders."),
    domain: list[str] = typer.Option(["chat", "safety", "math"], help="Specialists to build."),
    adapters: Path | None = typer.Option(
        None, help="Folder of <domain>/ adapters [default: data/specialists]."
    ),
) -> None:
    """Merge the shipped specialist adapters into HF folders the ``hf`` backend serves."""
    from services.train import SPECIALISTS_DIR, merge_adapter

    for d in domain:
        try:
            merge_adapter((adapters or SPECIALISTS_DIR) / d, out / d)
        except RewardRouterError as exc:
            raise _fail(exc) from exc
        typer.echo(f"{d}: {out / d}")


@app.command()
def collect(
    pairs: Path = typer.Option(..., help="Pairs file (data/README.md format)."),
    rms: Path = typer.Option(..., help="Pool file (e.g. deploy/rms/pool.yaml)."),
    out: Path = typer.Option(..., help="Behaviour file to write (.jsonl or .jsonl.gz)."),
    start: bool = typer.Option(False, help="Start the RM services that are not running."),
    batch_size: int = typer.Option(32, help="Pairs per /v1/compare request."),
    limit: int | None = typer.Option(None, help="Seeded sample of at most this many pairs."),
    seed: int = typer.Option(0),
) -> None:
    """Run every RM of a pool (through its service) on a pairs file; write a behaviour file."""
    from reward_router.data import load_pairs
    from services.pool import collect as collect_pairs
    from services.pool import load_pool, open_all, seeded_sample

    try:
        members = load_pool(rms)
        loaded = load_pairs(pairs)
    except RewardRouterError as exc:
        raise _fail(exc) from exc
    loaded = seeded_sample(loaded, limit, seed)
    with open_all(members, start):
        n = collect_pairs(loaded, members, out, batch_size=batch_size, progress=True)
    typer.echo(json.dumps({"pairs": len(loaded), "rms": [m.name for m in members], "lines": n}))


@app.command()
def accuracy(
    pairs: Path = typer.Option(..., help="Pairs file."),
    behavior: Path = typer.Option(..., help="Behaviour file of those pairs."),
    by: str = typer.Option("domain", help="domain | source | subset | all"),
    se: bool = typer.Option(True, help="Show each cell's standard error."),
) -> None:
    """Print each RM's accuracy (mean `correct`) per domain / source / subset, then the best
    single RM, the best RM per domain, majority vote and oracle over all pairs."""
    from reward_router.data import load_pairs
    from services.pool import accuracy_table, markdown_table, matrix_summary

    try:
        loaded = load_pairs(pairs)
        rm_names, table = accuracy_table(loaded, behavior, by=by)
        summary = matrix_summary(loaded, behavior)
    except RewardRouterError as exc:
        raise _fail(exc) from exc
    typer.echo(markdown_table(table, rm_names, se=se))
    name, acc, err = summary["best_single"]
    best_in, r_acc, r_err = summary["best_per_domain"]
    typer.echo(
        f"\n{summary['pairs']} pairs: best single {name} {acc:.3f} ± {err:.3f}; best RM per "
        f"domain {r_acc:.3f} ± {r_err:.3f} ("
        + ", ".join(f"{d}: {rm}" for d, rm in best_in.items())
        + f"); majority {summary['majority'][0]:.3f} ± {summary['majority'][1]:.3f}; "
        f"oracle {summary['oracle'][0]:.3f} ± {summary['oracle'][1]:.3f}"
    )


@app.command()
def evaluate(
    rms: Path = typer.Option(Path("deploy/rms/pool.yaml"), help="Pool file."),
    out: Path = typer.Option(Path("results/pool-eval"), help="Folder for behaviour files."),
    limit: int = typer.Option(200, help="Pairs sampled per column (seeded)."),
    start: bool = typer.Option(True, help="Start the RM services that are not running."),
    reuse: bool = typer.Option(False, help="Read behaviour files already in --out (resume)."),
    seed: int = typer.Option(0),
    data_dir: Path = typer.Option(Path("data/pairs")),
) -> None:
    """The pool's accuracy table: held-out chat / safety / math and the shipped eval sets."""
    from services.pool import load_pool, open_all, run_evaluation

    try:
        members = load_pool(rms)
        with open_all(members, start):
            text = run_evaluation(
                members, out, data_dir=data_dir, limit=limit, seed=seed, reuse=reuse
            )
    except RewardRouterError as exc:
        raise _fail(exc) from exc
    typer.echo(text)
