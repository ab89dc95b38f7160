"""Routing-core speed: decisions/s and updates/s of the Bayesian router, next to a naive sampler.

For N in {4, 16, 64} RMs and feature size d in {64, 384, 576} (contexts have D = d + 1 with the
intercept), measured side by side in one run:

* ``decisions/s``: pairs routed per second by ``BayesianPolicy.select`` on batches of ``--batch``
  pairs (the exact 1-D draw ``N(h^T mu, h^T Sigma h)`` from cached Cholesky factors).
* ``naive``: the textbook Thompson step, a full D-dimensional ``w ~ N(mu_n, Sigma_n)`` per pair
  per RM with ``Generator.multivariate_normal(method="cholesky")`` (factorises Sigma per draw),
  then ``h^T w``. Its time is bounded by measuring only a few pairs when N * D is large.
* ``full draw, cached``: a D-dimensional draw per pair per RM from a Cholesky factor of Sigma
  computed once (one GEMM per RM, as fast as a full draw gets); separates what the caching buys
  from what the 1-D draw buys.
* ``updates/s``: observations per second through ``BayesianPolicy.update`` in batches of
  ``--batch``, each followed by the lazy refresh of the touched RMs' factors (what the next
  ``select`` pays); ``sums only`` leaves the refresh out.

Run: ``.venv/bin/python benchmarks/bench_routing_core.py [--json OUT] [--quick]``.
"""

from __future__ import annotations

import os

# One BLAS thread: figures that do not depend on what else the machine runs (with several
# threads on a busy 2-core machine, OpenBLAS spin-waits and small factorisations get 5x slower).
# Set OPENBLAS_NUM_THREADS yourself to measure otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from gateway.routing import BayesianPolicy, make_policy, with_intercept

N_RMS = (4, 16, 64)
DIMS = (64, 384, 576)


def rate(step: Callable[[], int], budget_s: float, min_calls: int = 1) -> float:
    """Items per second of ``step`` (which returns how many items it handled), run for about
    ``budget_s`` seconds and at least ``min_calls`` times."""
    step()  # warm caches and code paths; not timed
    items, calls = 0, 0
    start = time.perf_counter()
    while True:
        items += step()
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= min_calls and elapsed >= budget_s:
            return items / elapsed


def contexts(rng: np.random.Generator, b: int, d: int) -> np.ndarray:
    x = rng.normal(size=(b, d))
    return with_intercept(x / np.linalg.norm(x, axis=1, keepdims=True))


def trained_policy(n: int, d: int, seed: int) -> BayesianPolicy:
    """A Bayesian router that has already seen 8 observations per RM, so its factors are not the
    prior's identity."""
    rng = np.random.default_rng(seed)
    policy = make_policy(
        "bayesian",
        n_rms=n,
        dim=d + 1,
        rng=np.random.default_rng(seed + 1),
        prior_means=rng.normal(size=(n, d + 1)) / np.sqrt(d),
    )
    assert isinstance(policy, BayesianPolicy)
    h = contexts(rng, 8 * n, d)
    policy.update(h, np.arange(8 * n) % n, rng.random(8 * n))
    return policy


def measure(n: int, d: int, batch: int, budget_s: float, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    policy = trained_policy(n, d, seed)
    h = contexts(rng, batch, d)

    def exact() -> int:
        policy.select(h)
        return batch

    decisions = rate(exact, budget_s)

    means = policy.posteriors.means()
    covs = policy.posteriors.covariances()
    naive_rng = np.random.default_rng(seed + 2)
    # few pairs when N * D is large: one pair at N=64, D=577 is 64 factorisations of 577 x 577
    naive_pairs = max(1, min(batch, 20_000 // (n * d)))

    def naive() -> int:
        for row in h[:naive_pairs]:
            scores = [
                row @ naive_rng.multivariate_normal(means[k], covs[k], method="cholesky")
                for k in range(n)
            ]
            int(np.argmax(scores))
        return naive_pairs

    naive_rate = rate(naive, budget_s)

    factors = np.linalg.cholesky(covs)  # Sigma = F F^T, once

    def cached_full_draw() -> int:
        scores = np.empty((batch, n))
        for k in range(n):  # one GEMM per RM, like the exact draw
            w = means[k] + naive_rng.standard_normal((batch, d + 1)) @ factors[k].T
            scores[:, k] = np.einsum("bi,bi->b", w, h)
        np.argmax(scores, axis=1)
        return batch

    cached_rate = rate(cached_full_draw, budget_s)

    feedback = contexts(rng, batch, d)
    rewards = rng.random(batch)

    def update_and_refresh() -> int:
        policy.update(feedback, rng.integers(0, n, size=batch), rewards)
        policy.posteriors.means()  # the lazy refresh of the touched RMs' factors
        return batch

    def update_only() -> int:
        policy.update(feedback, rng.integers(0, n, size=batch), rewards)
        return batch

    updates = rate(update_and_refresh, budget_s)
    sums = rate(update_only, budget_s)
    return {
        "decisions_per_s": decisions,
        "naive_decisions_per_s": naive_rate,
        "cached_full_draw_per_s": cached_rate,
        "updates_per_s": updates,
        "update_sums_per_s": sums,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="short time budget per measurement")
    parser.add_argument("--batch", type=int, default=32, help="pairs per select/update call")
    args = parser.parse_args()
    budget = 0.05 if args.quick else 0.6

    console = Console(width=120)  # wide enough for every column when piped to a file
    table = Table(
        title=f"Routing core speed: pairs or observations per second (batch {args.batch}, "
        f"{budget:g} s per measurement, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']})"
    )
    columns = ("N", "d", "decisions", "naive", "ratio", "full draw cached", "updates", "sums only")
    for column in columns:
        table.add_column(column, justify="right")
    results = []
    start = time.perf_counter()
    for n in N_RMS:
        for d in DIMS:
            figures = measure(n, d, args.batch, budget)
            results.append(
                {
                    "n_rms": n,
                    "dim": d,
                    "decisions_per_s": figures["decisions_per_s"],
                    "naive_decisions_per_s": figures["naive_decisions_per_s"],
                    "updates_per_s": figures["updates_per_s"],
                }
            )
            table.add_row(
                str(n),
                str(d),
                f"{figures['decisions_per_s']:,.0f}",
                f"{figures['naive_decisions_per_s']:,.1f}",
                f"{figures['decisions_per_s'] / figures['naive_decisions_per_s']:,.0f}x",
                f"{figures['cached_full_draw_per_s']:,.0f}",
                f"{figures['updates_per_s']:,.0f}",
                f"{figures['update_sums_per_s']:,.0f}",
            )
    console.print(table)
    console.print(f"total {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results}, indent=2) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
