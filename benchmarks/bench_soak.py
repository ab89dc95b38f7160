"""A soak: two replicas on Redis at a fixed rate for ``--duration`` seconds, with a Redis
SIGKILL, a restore of Redis from an older copy of its files, and a gateway SIGKILL in the run.

The cluster is the fault tests' (tests/reliability/faults.py: Redis with AOF ``appendfsync
always``, RMs ``length``, ``verifier`` and a stand-in external one, two gateway replicas over a
tiny router). The loop is the fault tests' driver (the real client with the trainer's patience),
paced to ``--rate`` steps per second, each step ``--pairs`` pairs routed on alternating replicas
and their feedback posted. The faults, at fixed fractions of the run:

* 1/5: ``kill -9`` Redis, restarted on its AOF 2 s later (nothing acknowledged may be lost);
* 2/5: Redis stopped (``kill -9``), a copy of its files taken ("the older copy"), restarted;
* 3/5: ``kill -9`` Redis and restart it from that older copy: the feedback acknowledged between
  2/5 and 3/5 is gone from the log (as on a failover to a lagging replica); the replicas must
  notice, rebuild and agree with the log again;
* 4/5: ``kill -9`` gateway 1, restarted 2 s later.

Printed: the books (acknowledged, in the log, lost, and whether every lost one was acknowledged
inside the restore's window), log duplicates, both replicas' observation counts, and the largest
difference between each replica's posterior and the one folded undisturbed from the final log;
the replicas' rebuild counts.

    .venv/bin/python benchmarks/bench_soak.py --duration 600 --rate 1
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.procs import start_redis  # noqa: E402
from tests.reliability import faults as F  # noqa: E402


def rebuilds(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r"^reward_router_gateway_rebuilds_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--rate", type=float, default=1.0, help="steps per second")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    steps = int(args.duration * args.rate)
    marks = {round(steps * k / 5): k for k in (1, 2, 3, 4)}
    window: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, F.cluster_running(Path(tmp) / "c") as c:
        ns = F.new_namespace(c, "soak")
        older = Path(tmp) / "older-redis"
        t0 = time.monotonic()

        def restart_gateway_later() -> None:
            time.sleep(2.0)
            c.start_gateway(1)

        def before_step(step: int) -> None:
            delay = t0 + (step - 1) / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            k = marks.get(step)
            if k == 1:
                c.restart_redis(down_s=2.0)
            elif k == 2:
                port = c.redis.port
                c.note("kill -9 redis, copy its files (the older copy)")
                c.redis.kill(signal.SIGKILL)
                shutil.copytree(c.redis_dir, older)
                c.redis = start_redis(port, c.redis_dir)
                window["from"] = step
            elif k == 3:
                port = c.redis.port
                c.note("kill -9 redis, restart it from the older copy")
                c.redis.kill(signal.SIGKILL)
                shutil.rmtree(c.redis_dir)
                shutil.copytree(older, c.redis_dir)
                c.redis = start_redis(port, c.redis_dir)
                window["to"] = step
            elif k == 4:
                c.kill_gateway(1)
                threading.Thread(target=restart_gateway_later, daemon=True).start()

        led = F.driver_loop(
            c,
            ns,
            steps=steps,
            pairs_per_step=args.pairs,
            route_on=lambda step: step % 2,
            before_step=before_step,
            failover=True,
            patience_s=120.0,
        )
        # Both replicas up and caught up, then the books.
        c.heal()
        audit = F.audit(c, ns, led)
        routed = list(led.routes)  # in step order
        step_of = {rid: i // args.pairs + 1 for i, rid in enumerate(routed)}
        log_ids = set(audit.log_route_ids)
        lost = led.acked - log_ids
        in_window = all(window["from"] <= step_of[r] < window["to"] for r in lost)
        out: dict[str, Any] = {
            "duration_s": round(time.monotonic() - t0, 1),
            "steps": led.steps_done,
            "pairs_answered": led.pairs_answered,
            "pairs_unanswered": led.pairs_unanswered,
            "retries": led.retries,
            "acknowledged": len(led.acked),
            "log_entries": audit.log_entries,
            "lost": len(lost),
            "lost_all_in_restore_window": in_window,
            "restore_window_steps": [window["from"], window["to"]],
            "acked_outside_window_missing": sum(
                1 for r in lost if not window["from"] <= step_of[r] < window["to"]
            ),
            "unacked_applied": audit.unacked_applied,
            "log_duplicates": audit.log_duplicates,
            "observations_per_replica": audit.observations,
            "seq_per_replica": audit.seq,
            "posterior_max_abs_diff": audit.posterior_diff,
            "replica_max_abs_diff": audit.replica_diff,
            "rebuilds_per_replica": [rebuilds(g.url) for g in c.gateways],
            "events": c.events,
        }
        print(json.dumps(out, indent=1))
        if args.json is not None:
            args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
