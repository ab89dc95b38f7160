"""A routing reference line: per-RM ridge regressions of correctness on the replay's features.

For each RM, a ridge regression predicts its ``correct`` from the pair features the replay uses
(``[(e+e')/2 ; |e-e'|]``, all-MiniLM-L6-v2, cached), cross-fitted over the replay's group folds
(seed 0); each held-out pair goes to the RM with the highest prediction, RMs named in
``--needs-reference`` only where the pair has a reference (as the gateway dispatches). No
posterior, no online phase: a plain linear router, to hold the offline router against on the
same folds. Printed per ``--alpha``: accuracy overall and per domain, and the routing share.

    .venv/bin/python benchmarks/linear_router_probe.py --pairs data/pairs/pool-heldout.jsonl.gz \\
        --behavior data/rm_outputs/pool-heldout.jsonl.gz --needs-reference verifier
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gateway.replay import group_folds
from gateway.replay_cli import _features
from reward_router.data import load_behavior, load_pairs


def ridge_fit_predict(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge regression with an unpenalised intercept, solved in closed form."""
    mu, y0 = x.mean(axis=0), y.mean(axis=0)
    xc = x - mu
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - y0))
    return (x_new - mu) @ w + y0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=Path, required=True)
    ap.add_argument("--behavior", type=Path, required=True)
    ap.add_argument("--needs-reference", default="", help="Comma-separated RM names.")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--alpha", default="10,100,1000", help="Ridge penalties to try.")
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()

    matrix = load_behavior(args.behavior, load_pairs(args.pairs))
    x = np.asarray(_features(matrix, "minilm", args.max_length, None), dtype=np.float64)
    correct = matrix.correct
    domains = np.array([p.domain for p in matrix.pairs])
    has_ref = np.array([p.reference is not None for p in matrix.pairs])
    needs = np.array([rm in args.needs_reference.split(",") for rm in matrix.rms])
    fold = group_folds([p.group for p in matrix.pairs], args.folds, np.random.default_rng(0))
    for alpha in (float(a) for a in args.alpha.split(",")):
        pred = np.zeros_like(correct)
        for k in range(args.folds):
            tr, te = fold != k, fold == k
            pred[te] = ridge_fit_predict(x[tr], correct[tr], x[te], alpha)
        pred[:, needs] = np.where(has_ref[:, None], pred[:, needs], -np.inf)
        pick = pred.argmax(axis=1)
        q = correct[np.arange(len(pick)), pick]
        per = {str(d): round(float(q[domains == d].mean()), 3) for d in sorted(set(domains))}
        share = {rm: round(float((pick == j).mean()), 3) for j, rm in enumerate(matrix.rms)}
        print(f"alpha {alpha:g}: accuracy {q.mean():.3f}  by domain {per}  share {share}")


if __name__ == "__main__":
    main()
