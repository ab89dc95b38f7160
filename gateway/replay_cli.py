"""``reward-router replay``: every routing policy, replayed on recorded reward-model behaviour."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gateway.replay_options import (
    AuditRateOpt,
    AuditRmOpt,
    BatchSizeOpt,
    CacheDirOpt,
    CalibrateOpt,
    EncoderBackendOpt,
    EncoderOpt,
    FoldsOpt,
    JsonOpt,
    MaxCallsOpt,
    MaxLengthOpt,
    NeedsReferenceOpt,
    OfflineShareOpt,
    PoliciesOpt,
    RewardNoiseOpt,
    RewardOpt,
    SecondOpinionMarginOpt,
    SeedsOpt,
    SetOpt,
    StreamOrderOpt,
)
from reward_router.errors import RewardRouterError

console = Console(stderr=True)


def _parse_settings(items: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``POLICY.PARAM=VALUE`` → policy params; ``router.PARAM=VALUE`` → router params."""
    from reward_router.errors import ConfigError

    policy: dict[str, dict[str, Any]] = {}
    router: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        target, dot, param = key.partition(".")
        if not sep or not dot or not param:
            raise ConfigError("--set", f"expected POLICY.PARAM=VALUE, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if target == "router":
            router[param] = value
        else:
            policy.setdefault(target, {})[param] = value
    return policy, router


def replay(
    pairs: Annotated[Path, typer.Option(help="Pairs file (JSONL or JSONL.gz).")],
    behavior: Annotated[Path, typer.Option(help="Behaviour file: what each RM said per pair.")],
    policies: PoliciesOpt = "all",
    folds: FoldsOpt = 5,
    seeds: SeedsOpt = 5,
    batch_size: BatchSizeOpt = 8,
    reward_noise: RewardNoiseOpt = 0.0,
    reward: RewardOpt = "correct",
    stream_order: StreamOrderOpt = "shuffled",
    offline_share: OfflineShareOpt = 1.0,
    max_calls_per_pair: MaxCallsOpt = 1.0,
    second_opinion_margin: SecondOpinionMarginOpt = None,
    audit_rate: AuditRateOpt = 0.0,
    audit_rm: AuditRmOpt = None,
    needs_reference: NeedsReferenceOpt = "",
    encoder: EncoderOpt = "minilm",
    encoder_backend: EncoderBackendOpt = "torch",
    max_length: MaxLengthOpt = 256,
    cache_dir: CacheDirOpt = None,
    set_: SetOpt = None,
    calibrate: CalibrateOpt = True,
    seed: Annotated[int, typer.Option(help="Root seed.")] = 0,
    json_out: JsonOpt = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG plot here.")] = None,
) -> None:
    """Replay every policy on recorded RM behaviour, cross-fitted, and compare them."""
    try:
        _replay(
            pairs, behavior, policies, folds, seeds, batch_size, reward_noise, encoder,
            max_length, cache_dir, set_ or [], calibrate, seed, json_out, plot,
            {"reward": reward, "stream_order": stream_order,
             "offline_share": offline_share,
             "max_calls_per_pair": max_calls_per_pair,
             "second_opinion_margin": second_opinion_margin,
             "audit_rate": audit_rate, "audit_rm": audit_rm,
             "needs_reference": needs_reference},
            encoder_backend=encoder_backend,
        )  # fmt: skip
    except RewardRouterError as exc:
        console.print(f"error: {exc}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2) from exc


def _replay(
    pairs_path: Path,
    behavior_path: Path,
    policies_spec: str,
    folds: int,
    seeds: int,
    batch_size: int,
    reward_noise: float,
    encoder_ref: str,
    max_length: int,
    cache_dir: Path | None,
    settings: list[str],
    calibrate: bool,
    seed: int,
    json_out: Path | None,
    plot: Path | None,
    options: dict[str, Any],
    encoder_backend: str = "torch",
) -> None:
    from rich.progress import Progress

    from gateway.replay import (
        ReplayConfig,
        parse_policies,
        run_replay,
        split_names,
        torch_router_fitter,
    )
    from reward_router.data import load_behavior, load_pairs

    policy_params, router_params = _parse_settings(settings)
    config = ReplayConfig(
        folds=folds,
        seeds=seeds,
        batch_size=batch_size,
        reward_noise=reward_noise,
        policies=parse_policies(policies_spec),
        policy_params=policy_params,
        seed=seed,
        **{**options, "needs_reference": split_names(options["needs_reference"])},
    )
    pairs = load_pairs(pairs_path)
    matrix = load_behavior(behavior_path, pairs)
    console.print(
        f"{behavior_path.name}: {matrix.n_pairs} pairs with behaviour lines "
        f"({matrix.skipped_pairs} of {len(pairs)} in the pairs file skipped), {matrix.n_rms} RMs"
    )
    features = _features(matrix, encoder_ref, max_length, cache_dir, encoder_backend)
    fitter = torch_router_fitter(router_params, calibrate=calibrate)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("replay", total=seeds * folds)

        def progress(done: int, total: int, message: str) -> None:
            bar.update(task, completed=done, description=f"replay {message}")

        result = run_replay(matrix, features, config, fitter, progress)
    _print_table(result)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if plot is not None:
        from gateway.replay_plot import plot_replay

        plot_replay(result, plot, title=behavior_path.name)
        console.print(f"wrote {plot}")


def _features(
    matrix: Any, encoder_ref: str, max_length: int, cache_dir: Path | None, backend: str = "torch"
) -> Any:
    from gateway.features import PairFeaturizer, load_backend_encoder
    from reward_router.models import cache_root

    encoder = load_backend_encoder(encoder_ref, backend=backend, max_length=max_length)
    featurizer = PairFeaturizer(encoder, cache_dir=cache_dir or cache_root() / "embeddings")
    return featurizer.featurize(
        [p.prompt for p in matrix.pairs],
        [p.chosen for p in matrix.pairs],
        [p.rejected for p in matrix.pairs],
    )


def _print_table(result: Any) -> None:
    out = Console(width=max(Console().width, 160))
    domains = sorted(set(result.domains))
    js = result.to_json()
    table = Table(
        title=f"replay: {result.n_pairs} pairs, {result.folds} folds x {result.seeds} seeds, "
        f"reward {js['reward']}, stream {js['stream_order']}"
        + (f", offline share {js['offline_share']:g}" if js["offline_share"] < 1 else "")
    )
    table.add_column("policy")
    table.add_column("accuracy", justify="right")
    table.add_column("± se", justify="right")
    table.add_column("RM calls/pair", justify="right")
    for k in range(1, 5):
        table.add_column(f"Q{k}", justify="right")
    for d in domains:
        table.add_column(d, justify="right")
    summary = js["policies"]
    for name, row in sorted(summary.items(), key=lambda kv: -kv[1]["accuracy"]):
        table.add_row(
            name,
            f"{row['accuracy']:.3f}",
            f"{row['accuracy_se']:.3f}",
            f"{row['rm_calls_per_pair']:.2f}",
            *(f"{q:.3f}" for q in row["quarters"]),
            *(f"{row['by_domain'][d]:.3f}" for d in domains),
        )
    out.print(table)
    m = js["matrix"]
    out.print(
        f"matrix: best single {m['best_single']:.3f}, best RM per domain "
        f"{m['best_per_domain']:.3f}, oracle {m['oracle']:.3f} (chosen on all its rows)"
    )
    for name, row in summary.items():
        gain = row.get("gain_over_no_online")
        if gain:
            out.print(
                f"{name} - {gain['versus']}: {gain['accuracy']:+.3f} ± {gain['accuracy_se']:.3f}"
                f" overall, {gain['last_quarter']:+.3f} ± {gain['last_quarter_se']:.3f} in the"
                " last quarter (online phase's gain, paired by seed)"
            )
    if "bayesian" in summary and "best-single" in summary:
        delta = summary["bayesian"]["accuracy"] - summary["best-single"]["accuracy"]
        verdict = "beats" if delta > 0 else "does NOT beat"
        out.print(f"bayesian {verdict} best-single: {delta:+.3f} accuracy")
    for name in ("bayesian", "bayesian-no-online", "laser"):
        if name in result.traces:
            share = result.pick_share(name)
            top = sorted(zip(share, result.rms, strict=True), reverse=True)[:4]
            picks = ", ".join(f"{rm} {s:.0%}" for s, rm in top if s > 0)
            out.print(f"{name} routing share: {picks}")
    if result.router_valid_accuracy:
        acc = sum(result.router_valid_accuracy) / len(result.router_valid_accuracy)
        out.print(f"offline router, mean held-out routing accuracy on training folds: {acc:.3f}")
