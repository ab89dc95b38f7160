"""``reward-router simulate``: every routing policy on synthetic RMs of known skill, real pairs.

    reward-router simulate --pairs data/pairs/hh-rlhf.jsonl.gz \\
        --pairs data/pairs/gsm8k-solutions.jsonl.gz --rms complementary --json OUT.json

The pairs (and so the router's features) are real; what each RM says on them is drawn by
:mod:`gateway.simulate` from a spec of per-domain accuracies with a shared per-pair difficulty.
Then the same cross-fitted replay as ``reward-router replay`` runs on that matrix and prints
the same table, plus the reference lines only a known spec gives: the best RM per domain, the
oracle and the share of the gap each router closes (docs/simulate.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from gateway.replay_cli import _features, _parse_settings, _print_table
from gateway.replay_options import (
    AuditRateOpt,
    AuditRmOpt,
    BatchSizeOpt,
    CacheDirOpt,
    CalibrateOpt,
    EncoderOpt,
    FoldsOpt,
    JsonOpt,
    MaxCallsOpt,
    MaxLengthOpt,
    OfflineShareOpt,
    PoliciesOpt,
    RewardNoiseOpt,
    RewardOpt,
    SecondOpinionMarginOpt,
    SeedsOpt,
    SetOpt,
    StreamOrderOpt,
)
from gateway.simulate import PRESETS
from reward_router.errors import RewardRouterError

console = Console(stderr=True)

#: Routers whose share of the best-single → best-per-domain gap is printed.
GAP_POLICIES = ("bayesian", "bayesian-no-online", "laser", "weighted-score")


def simulate(
    pairs: Annotated[
        list[Path],
        typer.Option(help="Pairs file (JSONL or JSONL.gz); repeat to mix several files."),
    ],
    rms: Annotated[
        str,
        typer.Option(
            help=f"Synthetic RMs: a preset ({', '.join(sorted(PRESETS))}) or a YAML / JSON"
            " spec file (docs/simulate.md)."
        ),
    ] = "complementary",
    rho: Annotated[
        float | None,
        typer.Option(help="Override the spec's error correlation (shared difficulty), [0, 1]."),
    ] = None,
    tie_rate: Annotated[
        float | None, typer.Option(help="Override the spec's tie rate, [0, 1).")
    ] = None,
    max_pairs: Annotated[
        int, typer.Option(help="Subsample this many pairs, spread evenly over the domains.")
    ] = 600,
    policies: PoliciesOpt = "all",
    folds: FoldsOpt = 5,
    seeds: SeedsOpt = 3,
    batch_size: BatchSizeOpt = 8,
    reward_noise: RewardNoiseOpt = 0.0,
    reward: RewardOpt = "correct",
    stream_order: StreamOrderOpt = "shuffled",
    offline_share: OfflineShareOpt = 1.0,
    max_calls_per_pair: MaxCallsOpt = 1.0,
    second_opinion_margin: SecondOpinionMarginOpt = None,
    audit_rate: AuditRateOpt = 0.0,
    audit_rm: AuditRmOpt = None,
    encoder: EncoderOpt = "minilm",
    max_length: MaxLengthOpt = 128,
    cache_dir: CacheDirOpt = None,
    set_: SetOpt = None,
    calibrate: CalibrateOpt = True,
    seed: Annotated[int, typer.Option(help="Root seed: subsample, simulated RMs and replay.")] = 0,
    json_out: JsonOpt = None,
) -> None:
    """Simulate RMs of stated per-domain skill on real pairs and replay every policy on them."""
    try:
        from gateway.replay import parse_policies

        spec = load_spec(rms, rho, tie_rate)
        policy_params, router_params = _parse_settings(set_ or [])
        options = {
            "folds": folds,
            "seeds": seeds,
            "batch_size": batch_size,
            "reward_noise": reward_noise,
            "policies": parse_policies(policies),
            "policy_params": policy_params,
            "seed": seed,
            "reward": reward,
            "stream_order": stream_order,
            "offline_share": offline_share,
            "max_calls_per_pair": max_calls_per_pair,
            "second_opinion_margin": second_opinion_margin,
            "audit_rate": audit_rate,
            "audit_rm": audit_rm,
        }
        _simulate(
            pairs, rms, spec, max_pairs, options, router_params, calibrate,
            (encoder, max_length, cache_dir), json_out,
        )  # fmt: skip
    except RewardRouterError as exc:
        console.print(f"error: {exc}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2) from exc


def load_spec(ref: str, rho: float | None = None, tie_rate: float | None = None) -> Any:
    """A preset by name or a YAML / JSON file of the same shape, with optional overrides."""
    import yaml

    from gateway.simulate import parse_spec
    from reward_router.errors import ConfigError

    if ref in PRESETS:
        data: Any = dict(PRESETS[ref])
    else:
        path = Path(ref)
        if not path.is_file():
            raise ConfigError(
                "rms", f"{ref!r} is neither a preset ({sorted(PRESETS)}) nor a spec file"
            )
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError("rms", f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("rms", f"{path}: must be a mapping with an 'rms' list")
    if rho is not None:
        data["rho"] = rho
    if tie_rate is not None:
        data["tie_rate"] = tie_rate
    return parse_spec(data)


def load_pair_files(paths: list[Path]) -> list[Any]:
    """Every pair of every file, in order; an id found in two files is an error."""
    from reward_router.data import load_pairs
    from reward_router.errors import ConfigError, DataFormatError

    if not paths:
        raise ConfigError("pairs", "at least one --pairs file is needed")
    out: list[Any] = []
    where: dict[str, Path] = {}
    for path in paths:
        for pair in load_pairs(path):
            if pair.id in where:
                raise DataFormatError(
                    str(path), None, "id", f"duplicate id {pair.id!r} (also in {where[pair.id]})"
                )
            where[pair.id] = path
            out.append(pair)
    return out


def replay_on(
    matrix: Any,
    features: np.ndarray,
    options: dict[str, Any],
    router_params: dict[str, Any],
    calibrate: bool,
    progress: Any,
) -> Any:
    """The cross-fitted replay on a simulated matrix: the one place this command calls it."""
    from gateway.replay import ReplayConfig, run_replay, torch_router_fitter

    fitter = torch_router_fitter(router_params, calibrate=calibrate)
    return run_replay(matrix, features, ReplayConfig(**options), fitter, progress)


def _simulate(
    pair_paths: list[Path],
    rms_ref: str,
    spec: Any,
    max_pairs: int,
    options: dict[str, Any],
    router_params: dict[str, Any],
    calibrate: bool,
    encoding: tuple[str, int, Path | None],
    json_out: Path | None,
) -> None:
    from rich.progress import Progress

    from gateway.simulate import (
        PAPER_FIGURES,
        domain_probe,
        probe_report,
        simulate_behavior,
        stratified_subsample,
        summarize,
    )

    seed, folds, seeds = options["seed"], options["folds"], options["seeds"]
    all_pairs = load_pair_files(pair_paths)
    # Entropy (seed, 1): independent of the replay's own SeedSequence(seed) streams.
    subsample_rng, behavior_rng, probe_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence((seed, 1)).spawn(3)
    )
    rows = stratified_subsample([p.domain for p in all_pairs], max_pairs, subsample_rng)
    pairs = [all_pairs[i] for i in rows]
    matrix = simulate_behavior(pairs, spec, behavior_rng)
    summary = summarize(matrix, spec)
    console.print(
        f"simulate {rms_ref}: {matrix.n_pairs} of {len(all_pairs)} pairs "
        f"({', '.join(f'{d} {n}' for d, n in summary.domains.items())}), {matrix.n_rms} RMs, "
        f"rho {spec.rho:g}, tie rate {spec.tie_rate:g}"
    )
    named = {d for rm in spec.rms for d in rm.accuracy}
    absent = sorted(named - set(summary.domains))
    if absent:
        console.print(f"note: the spec names domains absent from these pairs: {', '.join(absent)}")
    _print_spec(summary)
    features = _features(matrix, *encoding)
    predicted = domain_probe(
        features, [p.domain for p in pairs], [p.group for p in pairs], probe_rng
    )
    probe = probe_report(matrix, predicted, summary)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("replay", total=seeds * folds)

        def progress(done: int, total: int, message: str) -> None:
            bar.update(task, completed=done, description=f"replay {message}")

        result = replay_on(matrix, features, options, router_params, calibrate, progress)
    _print_table(result)
    gap = _gap_closed(result, summary)
    _print_reference(summary, probe, gap, PAPER_FIGURES)
    if json_out is not None:
        data = {
            **result.to_json(),
            "simulation": {
                "rms_spec": rms_ref,
                "spec": spec.to_json(),
                "pairs_files": [str(p) for p in pair_paths],
                "max_pairs": max_pairs,
                "seed": seed,
                **summary.to_json(),
                "domain_probe": probe.to_json(),
            },
            "gap_closed": gap,
            "paper": PAPER_FIGURES,
        }
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(data, indent=2) + "\n")
        console.print(f"wrote {json_out}")


def _gap_closed(result: Any, summary: Any) -> dict[str, float | None]:
    """(policy − best-single) / (best-per-domain − best-single), both lines in hindsight.

    None where the gap is under 0.005 (no RM is better anywhere: there is nothing to close).
    """
    base = summary.best_single[1]
    gap = summary.best_per_domain - base
    out: dict[str, float | None] = {}
    for name in GAP_POLICIES:
        if name in result.traces:
            acc = float(result.accuracy(name).mean())
            out[name] = (acc - base) / gap if gap >= 0.005 else None
    return out


def _print_spec(summary: Any) -> None:
    out = Console(width=max(Console().width, 140))
    domains = list(summary.domains)
    table = Table(title="synthetic RMs: spec → realised accuracy (ties count half)")
    table.add_column("RM")
    for d in domains:
        table.add_column(d, justify="right")
    for rm, by_domain in summary.accuracy.items():
        table.add_row(rm, *(f"{summary.expected[rm][d]:.2f} → {by_domain[d]:.3f}" for d in domains))
    out.print(table)
    out.print(f"mean correlation of errors between RMs: {summary.error_correlation:.3f}")


def _print_reference(
    summary: Any, probe: Any, gap: dict[str, float | None], paper: dict[str, Any]
) -> None:
    out = Console(width=max(Console().width, 140))
    rm, acc = summary.best_single
    per_domain = ", ".join(f"{d}: {r}" for d, r in summary.best_rm_per_domain.items())
    out.print(
        f"best single RM (hindsight, all rows): {rm} {acc:.3f}"
        f" (spec: {summary.expected_best_single:.3f})"
    )
    out.print(
        f"best RM per domain (hindsight): {summary.best_per_domain:.3f} ({per_domain};"
        f" spec: {summary.expected_best_per_domain:.3f})"
    )
    out.print(f"oracle (some RM right): {summary.oracle:.3f}")
    recall = ", ".join(f"{d} {r:.0%}" for d, r in probe.recall.items())
    out.print(
        f"domain probe (linear, held out): tells the domain of {probe.accuracy:.1%} of pairs"
        f" ({recall}); routing each pair to its predicted domain's best RM:"
        f" {probe.routed_accuracy:.3f}. The RMs' skill depends on the domain alone: that is"
        " what a router has to learn from the features."
    )
    for name, share in gap.items():
        text = "n/a (no gap)" if share is None else f"{share:+.0%}"
        out.print(f"{name}: share of the gap best-single → best-per-domain closed: {text}")
    figures = paper["labelling_accuracy_percent"]
    out.print(
        f"paper ({paper['source']}), labelling accuracy under its own controlled protocol: "
        + ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
        + ". Not comparable: here synthetic RMs on real pair features, cross-fitted folds,"
        " this project's policies (docs/simulate.md)."
    )
