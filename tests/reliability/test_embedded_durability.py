"""The persistent embedded store (SQLite, ``store_path``) under a real SIGKILL.

A real gateway process (no Redis) takes routes and feedback from four client threads and is
killed with SIGKILL in the middle of that traffic, then restarted on the same file. Every
feedback it acknowledged must still be there: re-sent, each one answers ``duplicate`` (none
``unknown``, none applied a second time), the namespace keeps the policy it was created with,
and the posterior's observation count equals the acknowledged feedback plus whatever of the
in-flight batches was committed before the kill. A second restart without snapshots rebuilds
the same posterior from the log alone.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.gateway.helpers import gateway_config, pairs, posteriors, start_gateway, start_rm
from tests.procs import Proc


def _client_loop(
    url: str, worker: int, stop: threading.Event, acked: set[str], inflight: set[str]
) -> None:
    with httpx.Client(base_url=url, timeout=10) as c:
        i = 0
        while not stop.is_set():
            try:
                r = c.post("/v1/route", json={"namespace": "run", "pairs": pairs(4, 1000 * i)})
                if r.status_code != 200:
                    return
                ids = [x["route_id"] for x in r.json()["results"]]
                inflight.update(ids)
                body = {"feedback": [{"route_id": rid, "reward": -0.1 * worker} for rid in ids]}
                f = c.post("/v1/feedback", json=body)
            except httpx.HTTPError:
                return  # the gateway died under us: what was in flight stays in `inflight`
            if f.status_code != 200:
                return
            assert f.json()["applied"] == len(ids), f.text
            acked.update(ids)
            inflight.difference_update(ids)
            i += 1


def _restart(cfg: Path, **changes: Any) -> Proc:
    data = yaml.safe_load(cfg.read_text())
    data.update(changes)
    cfg.write_text(yaml.safe_dump(data))
    return start_gateway(cfg)


def test_sigkill_loses_no_acknowledged_feedback(tmp_path: Path) -> None:
    rm = start_rm(tmp_path, "len", backend="length")
    db = tmp_path / "state" / "gateway.db"
    cfg = gateway_config(
        tmp_path,
        {"len": rm.url},
        store_path=str(db),
        snapshot_every=7,  # the restart starts from a snapshot and folds only the tail
        policy={"name": "bayesian-no-offline"},
    )
    gw = start_gateway(cfg)
    try:
        ready = httpx.get(f"{gw.url}/readyz").json()
        assert ready["durable"] is True and "warning" not in ready
        r = httpx.post(f"{gw.url}/v1/namespaces/run", json={"policy": "bayesian-no-offline"})
        assert r.status_code == 200, r.text

        acked: set[str] = set()
        inflight: set[str] = set()
        stop = threading.Event()
        threads = [
            threading.Thread(target=_client_loop, args=(gw.url, w, stop, acked, inflight))
            for w in range(4)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(acked) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        gw.kill(signal.SIGKILL)  # mid-traffic: some batches are in flight
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert len(acked) >= 200, len(acked)

        gw = _restart(cfg)
        body = {"feedback": [{"route_id": rid, "reward": 5.0} for rid in sorted(acked)]}
        again = httpx.post(f"{gw.url}/v1/feedback", json=body, timeout=60).json()
        assert again == {"applied": 0, "duplicate": len(acked), "unknown": 0}
        # In-flight batches: committed before the kill (duplicate now) or not (applied now);
        # their route ids were acknowledged by /v1/route, so none is unknown.
        if inflight:  # (the kill may also have caught every thread between two batches)
            body = {"feedback": [{"route_id": rid, "reward": 0.0} for rid in sorted(inflight)]}
            late = httpx.post(f"{gw.url}/v1/feedback", json=body, timeout=60).json()
            assert late["unknown"] == 0 and late["applied"] + late["duplicate"] == len(inflight)

        total = len(acked) + len(inflight)
        post = posteriors(gw.url, "run")
        assert post["policy"] == "bayesian-no-offline"
        assert post["seq"] == total == sum(rm["observations"] for rm in post["rms"])
        assert post["snapshot_seq"] > 0
        gw.kill(signal.SIGKILL)

        gw = _restart(cfg, snapshot_every=0)  # no snapshot: the whole log folded from the prior
        rebuilt = posteriors(gw.url, "run")
        assert rebuilt["seq"] == total and rebuilt["snapshot_seq"] == 0
        for a, b in zip(post["params"]["means"], rebuilt["params"]["means"], strict=True):
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-9
    finally:
        gw.kill()
        rm.kill()
