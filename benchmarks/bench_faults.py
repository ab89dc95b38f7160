"""Faults during a running training loop against a real cluster, and what they cost.

One cluster for the whole run (a private redis-server with AOF ``appendfsync always``, RM
services ``length`` and ``verifier``, a stand-in external RM that can go slow or answer garbage,
two gateway replicas sharing the Redis over a tiny router artifact), then each scenario in
turn on its own namespace, the cluster healed in between. The loop is the real
``reward-router train-dpo`` process (tiny random Llama policy) for the RM kill, the gateway kill
and the Redis restart, and a loop on the real client for the rest (see
tests/reliability/faults.py). Per scenario: pairs answered and failed, feedback acknowledged vs
applied (the observation log in Redis, and each replica's ``/v1/posteriors``), and the largest
difference between each replica's posterior and the one rebuilt undisturbed from the same
applied feedback.

    .venv/bin/python benchmarks/bench_faults.py --scenario all --json results/faults.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reliability.faults import SCENARIOS, Result, cluster_running  # noqa: E402

COLUMNS = (
    ("scenario", "scenario"),
    ("loop", "loop"),
    ("steps", "steps"),
    ("pairs_answered", "answered"),
    ("pairs_failed", "failed"),
    ("pairs_unanswered", "unanswered"),
    ("fallbacks", "fallbacks"),
    ("retries", "retries"),
    ("feedback_acked", "acked"),
    ("log_entries", "applied"),
    ("observations", "obs A/B"),
    ("log_duplicates", "dup in log"),
    ("lost", "lost"),
    ("posterior_max_abs_diff", "post. diff"),
    ("replica_max_abs_diff", "A-B diff"),
    ("ok", "ok"),
    ("wall_s", "wall s"),
)


def fmt(key: str, value: object) -> str:
    if key in ("posterior_max_abs_diff", "replica_max_abs_diff"):
        return f"{float(value):.1e}"  # type: ignore[arg-type]
    if key == "observations":
        return "/".join(str(v) for v in value)  # type: ignore[attr-defined]
    return str(value)


def table(rows: list[dict[str, object]]) -> str:
    cells = [[h for _, h in COLUMNS]] + [[fmt(k, r[k]) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", "what happened:"] + [
        f"  {r['scenario']} ({r['loop']}): {r['what']}" for r in rows
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="all", choices=["all", *SCENARIOS])
    ap.add_argument("--json", type=Path, help="write every row (and the fault timeline) here")
    ap.add_argument("--workdir", type=Path, help="keep logs and run folders here (default: tmp)")
    args = ap.parse_args()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]

    with tempfile.TemporaryDirectory(prefix="rr-faults-") as tmp:
        root = args.workdir or Path(tmp)
        t0 = time.monotonic()
        with cluster_running(root) as cluster:
            print(f"cluster up in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
            results: list[Result] = []
            for name in names:
                t1 = time.monotonic()
                got = SCENARIOS[name](cluster)
                results += got
                print(f"{name}: {time.monotonic() - t1:.0f} s", file=sys.stderr, flush=True)
                cluster.heal()
            events = list(cluster.events)
    rows = [r.row() for r in results]
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "events": events}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
