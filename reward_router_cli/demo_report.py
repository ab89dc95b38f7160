"""The demo's report folder: ``report.json``, PNG plots and ``summary.md``, from a finished run.

Everything is computed from what the run left on disk (``run/log.jsonl``, ``run/summary.json``),
the gateway's ``/v1/posteriors`` answer and the pool's behaviour file, so the report can be
rebuilt from those alone::

    files = write_report(folder, run=folder / "run", posteriors=post, stages=[...],
                         config={...}, pool=pool_dir, total_s=412.0)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reward_router.data import iter_jsonl


def read_log(run: Path) -> list[dict[str, Any]]:
    """The per-step records of a ``train-dpo`` run, in step order."""
    return [rec for _, rec in iter_jsonl(run / "log.jsonl")]


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + int(v)


def _shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items())} if total else {}


def routing_summary(log: Sequence[dict[str, Any]], rms: Sequence[str]) -> dict[str, Any]:
    """Routing counts and shares: overall, per prompt domain, first and second half of the run.

    >>> log = [{"rm_counts": {"a": 2}, "rm_by_domain": {"x": {"a": 2}}},
    ...        {"rm_counts": {"a": 1, "b": 1}, "rm_by_domain": {"x": {"b": 1}, "y": {"a": 1}}}]
    >>> s = routing_summary(log, ["a", "b"])
    >>> s["share"], s["by_domain"]["x"]["counts"]
    ({'a': 0.75, 'b': 0.25}, {'a': 2, 'b': 1})
    """
    overall: dict[str, int] = dict.fromkeys(rms, 0)
    halves: list[dict[str, int]] = [dict.fromkeys(rms, 0), dict.fromkeys(rms, 0)]
    domains: dict[str, dict[str, int]] = {}
    half = (len(log) + 1) // 2
    for i, rec in enumerate(log):
        _add(overall, rec.get("rm_counts") or {})
        _add(halves[0 if i < half else 1], rec.get("rm_counts") or {})
        for domain, counts in (rec.get("rm_by_domain") or {}).items():
            _add(domains.setdefault(domain, dict.fromkeys(rms, 0)), counts)
    return {
        "counts": overall,
        "share": _shares(overall),
        "first_half_share": _shares(halves[0]),
        "second_half_share": _shares(halves[1]),
        "by_domain": {d: {"counts": c, "share": _shares(c)} for d, c in sorted(domains.items())},
    }


def pool_accuracy(pool: Path) -> dict[str, dict[str, float]]:
    """Each RM's accuracy per domain on the pool's held-out pairs (the router's training data)."""
    from reward_router.data import load_pairs
    from services.pool import accuracy_table

    pairs = load_pairs(pool / "pairs.jsonl.gz")
    rms, table = accuracy_table(pairs, pool / "behavior.jsonl.gz", by="domain")
    return {d: {rm: round(row[rm][0], 4) for rm in rms} for d, row in table.items()}


def _series(log: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """One number per step (NaN where the step has none, e.g. a loss when every pair tied)."""
    return np.array([np.nan if rec.get(key) is None else rec[key] for rec in log], dtype=float)


def _plots(
    folder: Path, log: Sequence[dict[str, Any]], routing: dict[str, Any], rms: Sequence[str]
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {rm: plt.get_cmap("tab10")(i % 10) for i, rm in enumerate(rms)}
    steps = np.array([rec["step"] for rec in log])
    out: list[Path] = []

    # 1. Routing share per RM over steps (stacked), with the running share as lines.
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    per_step = np.array(
        [[(rec.get("rm_counts") or {}).get(rm, 0) for rm in rms] for rec in log], dtype=float
    )
    totals = np.maximum(per_step.sum(axis=1, keepdims=True), 1)
    bottom = np.zeros(len(steps))
    for j, rm in enumerate(rms):
        share = per_step[:, j] / totals[:, 0]
        left.bar(steps, share, bottom=bottom, width=0.85, color=colors[rm], label=rm)
        bottom += share
    left.set(xlabel="step", ylabel="share of the step's pairs", ylim=(0, 1))
    left.set_title("routing share per RM, per step")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    running = np.cumsum(per_step, axis=0) / np.maximum(np.cumsum(totals, axis=0), 1)
    for j, rm in enumerate(rms):
        right.plot(steps, running[:, j], color=colors[rm], label=rm)
    right.set(xlabel="step", ylabel="share of all pairs so far", ylim=(0, 1))
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_title("running routing share")
    right.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    out.append(_save(fig, folder / "routing_share.png"))

    # 2. Routing share per prompt domain.
    domains = list(routing["by_domain"])
    fig, ax = plt.subplots(figsize=(7, 0.7 * max(len(domains), 2) + 1.5))
    left_edge = np.zeros(len(domains))
    for rm in rms:
        vals = np.array([routing["by_domain"][d]["share"].get(rm, 0.0) for d in domains])
        ax.barh(domains, vals, left=left_edge, color=colors[rm], label=rm)
        left_edge += vals
    ax.set(xlabel="share of the domain's pairs", xlim=(0, 1))
    ax.set_title("which RM labelled each prompt domain")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    out.append(_save(fig, folder / "routing_by_domain.png"))

    # 3. DPO loss and the share of pairs the policy already ranks right.
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, _series(log, "loss"), "o-", color="tab:blue", label="DPO loss (non-tie pairs)")
    ax.axhline(np.log(2), color="gray", ls=":", label="log 2 (untrained)")
    ax.set(xlabel="step", ylabel="DPO loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax.twinx()
    ax2.plot(
        steps,
        _series(log, "margin_accuracy"),
        "s--",
        color="tab:orange",
        alpha=0.7,
        label="margin > 0 share",
    )
    ax2.set(ylabel="share of pairs with a positive margin", ylim=(0, 1))
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower left")
    ax.set_title("Online DPO loss")
    out.append(_save(fig, folder / "dpo_loss.png"))

    # 4. Rewards posted to the gateway (−DPO loss), overall and per RM.
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, _series(log, "mean_reward"), "k-", lw=2, label="all pairs")
    for rm in rms:
        ys = [(rec.get("reward_by_rm") or {}).get(rm, np.nan) for rec in log]
        ax.plot(steps, ys, "o", color=colors[rm], alpha=0.8, label=rm)
    ax.set(xlabel="step", ylabel="mean reward posted (−DPO loss)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("rewards fed back to the router, by the RM that labelled the pair")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    out.append(_save(fig, folder / "rewards.png"))
    return out


def _label_plots(folder: Path, label: dict[str, Any]) -> list[Path]:
    """Label accuracy per quarter (policy vs the matrix's baselines); routing share per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quarters = label["quarters"]
    names = list(label["overall"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = np.arange(1, len(quarters) + 1)
    for k, name in enumerate(names):
        acc = np.array([q["accuracy"][name][0] for q in quarters])
        se = np.array([q["accuracy"][name][1] for q in quarters])
        style = "o-" if name == "policy" else "s--"
        lw = 2.5 if name == "policy" else 1.2
        shift = xs + 0.04 * (k - len(names) / 2)
        ax.errorbar(shift, acc, yerr=se, fmt=style, capsize=3, label=name, lw=lw)
    ax.set(xlabel="quarter of the stream", ylabel="label accuracy", xticks=xs)
    ax.set_title(f"label stage: {label['pairs']} held-out pairs through the gateway")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    out = [_save(fig, folder / "label_accuracy.png")]

    rms = label["rms"]
    colors = {rm: plt.get_cmap("tab10")(i % 10) for i, rm in enumerate(rms)}
    domains = list(label["counts_by_domain"])
    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3.8), squeeze=False)
    for ax, d in zip(axes[0], domains, strict=True):
        bottom = np.zeros(len(quarters))
        for rm in rms:
            vals = np.array([q["share_by_domain"].get(d, {}).get(rm, 0.0) for q in quarters])
            ax.bar(xs, vals, bottom=bottom, color=colors[rm], label=rm)
            bottom += vals
        ax.set(title=f"{d} pairs", xlabel="quarter", ylim=(0, 1), xticks=xs)
    axes[0][0].set_ylabel("share routed to each RM")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    out.append(_save(fig, folder / "label_routing.png"))
    return out


def _label_markdown(label: dict[str, Any]) -> list[str]:
    names = list(label["overall"])
    quarters = label["quarters"]
    lines = [
        "## Label stage: the router picks one RM per pair",
        "",
        f"{label['pairs']} held-out pairs (never seen by the RMs or the router; "
        + ", ".join(f"{n} {d}" for d, n in label["domains"].items())
        + ") streamed through the live gateway, one RM per pair, the feedback being whether "
        "its label was right (namespace `demo-label`, `normalizer: none`). The other rows are "
        "what the pool's behaviour matrix says the same pairs got from best-single (the RM best "
        "on the router's training part), the best RM per domain (chosen there too), a majority "
        "vote of every RM, and the oracle (the best any RM did on the pair). Accuracy ± standard "
        "error.",
        "",
        "| | "
        + " | ".join(f"quarter {q['quarter']} (n={q['pairs']})" for q in quarters)
        + " | all |",
        "|---|" + "---:|" * (len(quarters) + 1),
    ]
    for name in names:
        cells = [f"{q['accuracy'][name][0]:.3f} ± {q['accuracy'][name][1]:.3f}" for q in quarters]
        acc, se = label["overall"][name]
        cells.append(f"**{acc:.3f} ± {se:.3f}**" if name == "policy" else f"{acc:.3f} ± {se:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"The live RM's answer matched its row in the matrix on "
        f"{label['matrix_agreement']:.1%} of the pairs; {label['fallbacks']} fallbacks.",
        "",
        "Where each domain's pairs went (share per quarter of the stream):",
        "",
        "| domain | RM | " + " | ".join(f"q{q['quarter']}" for q in quarters) + " | all |",
        "|---|---|" + "---:|" * (len(quarters) + 1),
    ]
    for d, counts in label["counts_by_domain"].items():
        total = sum(counts.values()) or 1
        for rm in label["rms"]:
            shares = [q["share_by_domain"].get(d, {}).get(rm, 0.0) for q in quarters]
            if not any(shares):
                continue
            lines.append(
                f"| {d} | {rm} | "
                + " | ".join(f"{v:.2f}" for v in shares)
                + f" | {counts[rm] / total:.2f} |"
            )
    lines += [
        "",
        "![label accuracy](label_accuracy.png)",
        "",
        "![label routing](label_routing.png)",
        "",
    ]
    return lines


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _markdown(report: dict[str, Any]) -> str:
    rms: list[str] = report["rms"]
    r = report["routing"]
    s = report["summary"]
    lines = [
        "# reward-router demo",
        "",
        f"{s['steps']} Online DPO steps of `{report['config']['policy']}` through the gateway "
        f"(policy `{report['posteriors']['policy']}`, namespace `{s['namespace']}`): "
        f"**{s['routed']} pairs routed, each to exactly one RM**, {s['feedback_applied']} "
        f"rewards applied, {s['fallbacks']} fallbacks, {s['ties']} ties. "
        f"Total time {report['total_s']:.0f} s.",
        "",
        "## Online DPO: where the pairs went",
        "",
        "| RM | share | first half | second half | "
        + " | ".join(f"{d} prompts" for d in r["by_domain"])
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(r["by_domain"]),
    ]
    for rm in rms:
        cells = [
            _pct(r["share"].get(rm, 0.0)),
            _pct(r["first_half_share"].get(rm)),
            _pct(r["second_half_share"].get(rm)),
            *(_pct(v["share"].get(rm, 0.0)) for v in r["by_domain"].values()),
        ]
        lines.append(f"| {rm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![routing share](routing_share.png)",
        "",
        "![routing by domain](routing_by_domain.png)",
        "",
        "## What the router learned from (its part of the pool's matrix, accuracy per RM)",
        "",
    ]
    acc = report["pool_accuracy"]
    if acc:
        lines.append("| RM | " + " | ".join(acc) + " |")
        lines.append("|---|" + "---:|" * len(acc))
        for rm in rms:
            lines.append(
                f"| {rm} | " + " | ".join(_pct(col.get(rm)) for col in acc.values()) + " |"
            )
    if report.get("label"):
        lines += ["", *_label_markdown(report["label"])]
    lines += [
        "",
        "## The posterior after the Online DPO run (gateway `/v1/posteriors`)",
        "",
        "| RM | observations | routes | ‖mean‖ | uncertainty |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in report["posteriors"]["rms"]:
        lines.append(
            f"| {p['name']} | {p['observations']} | {p['routes']} | "
            f"{_pct(p['mean_norm'])} | {_pct(p['uncertainty'])} |"
        )
    losses = [v for v in (rec.get("loss") for rec in report["steps"]) if v is not None]
    lines += [
        "",
        "## Training",
        "",
        f"DPO loss: first step {_pct(losses[0] if losses else None)}, last step "
        f"{_pct(losses[-1] if losses else None)} (log 2 = 0.69 is an untrained policy; a short "
        "run on a CPU moves it only a little).",
        "",
        "![DPO loss](dpo_loss.png)",
        "",
        "![rewards](rewards.png)",
        "",
        "## Time per stage",
        "",
        "| stage | seconds | cached |",
        "|---|---:|---|",
    ]
    for st in report["stages"]:
        lines.append(f"| {st['stage']} | {st['seconds']:.0f} | {'yes' if st['cached'] else ''} |")
    lines += [
        "",
        "Files: `report.json` (everything above, per step), `run/` (the trainer's log, summary "
        "and LoRA checkpoint), `cluster/` (the service files; `reward-router up --config "
        "cluster/cluster.yaml` starts the same cluster again, logs in `cluster/logs/`).",
        "",
    ]
    return "\n".join(lines)


def write_report(
    folder: Path,
    *,
    run: Path,
    posteriors: dict[str, Any],
    stages: Sequence[dict[str, Any]],
    config: dict[str, Any],
    pool: Path | None,
    total_s: float,
    label: dict[str, Any] | None = None,
) -> list[Path]:
    """Write report.json, the PNG plots and summary.md into ``folder``; returns their paths."""
    log = read_log(run)
    if not log:
        raise ValueError(f"{run / 'log.jsonl'} has no steps")
    summary = json.loads((run / "summary.json").read_text())
    rms = [p["name"] for p in posteriors["rms"]]
    routing = routing_summary(log, rms)
    report = {
        "config": config,
        "total_s": total_s,
        "stages": list(stages),
        "rms": rms,
        "summary": summary,
        "routing": routing,
        "pool_accuracy": pool_accuracy(pool) if pool is not None else {},
        "posteriors": posteriors,
        "label": label,
        "steps": [
            {
                k: rec.get(k)
                for k in (
                    "step", "routed", "ties", "loss", "mean_reward", "margin_mean",
                    "margin_accuracy", "rm_counts", "rm_by_domain", "reward_by_rm",
                    "fallbacks", "step_s",
                )
            }
            for rec in log
        ],
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    files = _plots(folder, log, routing, rms)
    if label:
        files += _label_plots(folder, label)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    (folder / "summary.md").write_text(_markdown(report))
    return [folder / "report.json", folder / "summary.md", *files]
