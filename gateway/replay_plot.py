"""PNG plot of a replay: accuracy per policy, and running accuracy along the stream."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gateway.replay import ReplayResult


def plot_replay(result: ReplayResult, path: Path, title: str = "") -> None:
    """Write a two-panel PNG: accuracy ± std per policy; cumulative accuracy over the stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(result.traces, key=lambda n: result.accuracy(n).mean())
    means = [result.accuracy(n).mean() for n in names]
    stds = [result.accuracy(n).std() for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = ["tab:red" if n == "bayesian" else "tab:gray" for n in names]
    left.barh(names, means, xerr=stds, color=colors)
    left.set_xlabel("accuracy (tie = 1/2)")
    left.set_xlim(max(0.0, min(means) - 0.1), min(1.0, max(means) + 0.05))
    left.set_title("accuracy per policy")
    for name in names:
        curve = result.cumulative_accuracy(name)
        style = "-" if name in ("bayesian", "best-single", "oracle") else ":"
        right.plot(np.arange(1, len(curve) + 1), curve, style, label=name)
    right.set_xlabel("pairs seen in the held-out stream")
    right.set_ylabel("running accuracy")
    right.set_title("cumulative accuracy over the stream")
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
