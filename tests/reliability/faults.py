"""Fault harness: a real cluster, a training loop, one fault injected mid-run, and an audit.

Shared by ``tests/reliability/test_faults.py`` and ``benchmarks/bench_faults.py``.

The cluster (:func:`start_cluster`) is all real processes on loopback: a private redis-server
with AOF (``appendfsync always``) in its own folder, two RM services that need no model
(``length``, ``verifier``), a stand-in for an external RM that can be told to misbehave
(:mod:`tests.reliability.stand_in_rm`), and two gateway replicas sharing the Redis, over a tiny
real router artifact. A fault kills (``kill -9``) and restarts a process on the same port.

Two training loops:

* :func:`train_dpo` runs the real ``reward-router train-dpo`` process (a tiny random Llama
  policy built here) and calls a watcher as its steps land in ``log.jsonl``;
* :func:`driver_loop` is a loop on the real client (``trainer_client.GatewayClient``) with the
  trainer's own patience logic (``with_patience``): route a batch, post a −loss per route id.
  It can duplicate, reorder and redirect feedback, which the trainer never does.

:func:`audit` then reads the namespace's observation log straight from Redis and checks it
against what the loop was told: every acknowledged feedback is in the log exactly once, the
replicas' observation counts equal the log, and each replica's posterior equals the one
rebuilt without any disturbance from the same applied feedback: the pure routing core
(``gateway.routing``) folding the logged ``(RM, h, raw reward)`` one at a time, from the prior,
through the namespace's normaliser.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from tests.gateway.helpers import build_router, pairs, start_rm
from tests.procs import Proc, free_port, start_process, start_redis
from tests.trainer.data import write_prompts

RMS = ("length", "verifier", "external")
REAL_RMS = ("length", "verifier")
PREFIX = "rrfault"
# The external stand-in is the RM that goes slow; a short read timeout bounds what it costs.
EXTERNAL_READ_TIMEOUT_S = 1.5
SLOW_DELAY_S = 4.0


# ---- the cluster ------------------------------------------------------------------------------


@dataclass
class FaultCluster:
    """Every process of the cluster, with kill/restart on the same port."""

    root: Path
    router: Path
    redis: Proc
    redis_dir: Path
    rms: dict[str, Proc]
    gateways: list[Proc]
    gateway_configs: list[Path]
    events: list[str] = field(default_factory=list)
    namespaces: int = 0

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def url(self, i: int) -> str:
        return self.gateways[i].url

    def note(self, what: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {what}")

    # RMs
    def kill_rm(self, name: str) -> None:
        self.note(f"kill -9 RM {name}")
        self.rms[name].kill(signal.SIGKILL)

    def start_rm(self, name: str) -> None:
        port = self.rms[name].port
        self.rms[name].kill()
        self.rms[name] = _start_rm(self.root, name, port)
        self.note(f"RM {name} back on port {port}")

    def set_external(self, mode: str, delay_s: float = SLOW_DELAY_S) -> None:
        r = httpx.post(
            f"{self.rms['external'].url}/mode", json={"mode": mode, "delay_s": delay_s}, timeout=5
        )
        r.raise_for_status()
        self.note(f"external RM mode {mode}")

    def external_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = httpx.get(f"{self.rms['external'].url}/stats", timeout=5).json()
        return out

    # gateways
    def kill_gateway(self, i: int) -> None:
        self.note(f"kill -9 gateway {i}")
        self.gateways[i].kill(signal.SIGKILL)

    def start_gateway(self, i: int) -> None:
        self.gateways[i].kill()
        self.gateways[i] = _start_gateway(self.gateway_configs[i])
        self.note(f"gateway {i} back")

    # Redis
    def restart_redis(self, down_s: float = 0.0, *, hold: int | None = None) -> None:
        """``kill -9`` redis-server, wait ``down_s``, start it on the same port and AOF dir.

        ``hold``: a process (the trainer) kept stopped (SIGSTOP) until Redis is dead, so it
        cannot race past the outage, however fast the machine is.
        """
        if hold is not None:
            os.kill(hold, signal.SIGSTOP)
        try:
            self.note("kill -9 redis")
            port = self.redis.port
            self.redis.kill(signal.SIGKILL)
        finally:
            if hold is not None:
                os.kill(hold, signal.SIGCONT)
        time.sleep(down_s)
        self.redis = start_redis(port, self.redis_dir)
        self.note("redis back")

    def heal(self) -> None:
        """Everything running and well-behaved again (between scenarios)."""
        for name, proc in list(self.rms.items()):
            if proc.popen.poll() is not None:
                self.start_rm(name)
        self.set_external("ok")
        if self.redis.popen.poll() is not None:
            self.redis = start_redis(self.redis.port, self.redis_dir)
        for i, g in enumerate(self.gateways):
            if g.popen.poll() is not None:
                self.start_gateway(i)
        self.wait_rms_available()
        self.prime_rms()

    def prime_rms(self) -> None:
        """One successful call to every RM from every replica, which clears the count of failed
        calls a fault left behind (a passing health check does not), so the next scenario
        starts from a clean slate. Uses ``best-single`` namespaces of its own."""
        for name in RMS:
            ns = f"prime-{name}"
            for g in self.gateways:
                body = {"policy": "best-single", "best_rm": name}
                httpx.post(f"{g.url}/v1/namespaces/{ns}", json=body, timeout=30).raise_for_status()
                pair = {"prompt": "prime", "response_a": "a", "response_b": "bb"}
                r = httpx.post(
                    f"{g.url}/v1/route", json={"namespace": ns, "pairs": [pair]}, timeout=60
                )
                r.raise_for_status()
                if r.json()["results"][0]["rm"] != name:
                    raise AssertionError(f"priming {name} on {g.url}: {r.text}")

    def wait_rms_available(self, timeout: float = 60.0) -> None:
        """Until both replicas see every RM healthy and out of cooldown (``/readyz``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = True
            for g in self.gateways:
                try:
                    body = httpx.get(f"{g.url}/readyz", timeout=5).json()
                except (httpx.HTTPError, ValueError):
                    ok = False
                    break
                ok = ok and all(body.get("rms", {}).get(n) for n in RMS)
            if ok:
                return
            time.sleep(0.2)
        raise TimeoutError("RMs not available on every replica in time")

    def close(self) -> None:
        for p in [*self.gateways, *self.rms.values(), self.redis]:
            p.kill()


def rm_available(cluster: FaultCluster, replica: int, name: str) -> bool | None:
    """Whether a replica's ``/readyz`` counts RM ``name`` available (None: no answer)."""
    try:
        body = httpx.get(f"{cluster.url(replica)}/readyz", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None
    state: bool | None = body.get("rms", {}).get(name)
    return state


def _start_rm(root: Path, name: str, port: int | None = None) -> Proc:
    if name == "external":
        port = port or free_port()
        args = [sys.executable, "-m", "tests.reliability.stand_in_rm", "--port", str(port)]
        return start_process(args, port, ready_url=f"http://127.0.0.1:{port}/readyz")
    return start_rm(root, name, backend=name, port=port)


def _start_gateway(config: Path) -> Proc:
    port = int(yaml.safe_load(config.read_text())["port"])
    args = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    return start_process(args, port, ready_url=f"http://127.0.0.1:{port}/readyz", timeout=120)


def gateway_settings(rm_urls: dict[str, str], router: Path, redis_url: str) -> dict[str, Any]:
    """The replicas' settings: short health interval and cooldown so a test sees RMs come back,
    small snapshots so a restart starts from a snapshot and folds only the tail."""
    return {
        "rms": [
            {
                "name": n,
                "url": u,
                "connect_timeout_s": 1.0,
                "read_timeout_s": EXTERNAL_READ_TIMEOUT_S if n == "external" else 30.0,
            }
            for n, u in rm_urls.items()
        ],
        "router_path": str(router),
        "redis_url": redis_url,
        "key_prefix": PREFIX,
        "health_interval_s": 0.5,
        "failure_threshold": 3,
        "cooldown_s": 3.0,
        "snapshot_every": 5,
        "seed": 0,
        "log_level": "warning",
    }


def start_cluster(root: Path) -> FaultCluster:
    """Start Redis, the three RMs and two gateway replicas; the caller must ``close()``.

    Independent processes start concurrently (the router artifact is built meanwhile), then the
    two replicas together: most of a start is waiting on imports and readiness.
    """
    root.mkdir(parents=True, exist_ok=True)
    redis_dir = root / "redis"
    redis_dir.mkdir(exist_ok=True)
    started: list[Proc] = []

    def collect(futures: list[Future[Any]]) -> list[Any]:
        out, errors = [], []
        for f in futures:
            try:
                out.append(f.result())
            except BaseException as exc:  # keep collecting: every started process must stop
                errors.append(exc)
                out.append(None)
        started.extend(p for p in out if isinstance(p, Proc))
        if errors:
            raise errors[0]
        return out

    try:
        with ThreadPoolExecutor(max_workers=5) as pool:
            router, redis, *rm_procs = collect(
                [
                    pool.submit(build_router, root / "artifacts", RMS),
                    pool.submit(start_redis, free_port(), redis_dir),
                    *(pool.submit(_start_rm, root, name) for name in RMS),
                ]
            )
            rms: dict[str, Proc] = dict(zip(RMS, rm_procs, strict=True))
            settings = gateway_settings(
                {n: p.url for n, p in rms.items()}, router, f"redis://127.0.0.1:{redis.port}/0"
            )
            configs: list[Path] = []
            for i in range(2):
                configs.append(root / f"gateway-{i}.yaml")
                configs[-1].write_text(yaml.safe_dump({**settings, "port": free_port()}))
            gateways = collect([pool.submit(_start_gateway, cfg) for cfg in configs])
    except BaseException:
        for p in started:
            p.kill()
        raise
    return FaultCluster(root, router, redis, redis_dir, rms, gateways, configs)


@contextmanager
def cluster_running(root: Path) -> Iterator[FaultCluster]:
    c = start_cluster(root)
    try:
        yield c
    finally:
        c.close()


# ---- what the loop saw ------------------------------------------------------------------------


@dataclass
class Ledger:
    """The training loop's side of the books."""

    pairs_answered: int = 0
    pairs_failed: int = 0  # pairs of route calls that failed (and were retried)
    pairs_unanswered: int = 0  # pairs never answered
    fallbacks: int = 0
    by_rm: Counter[str] = field(default_factory=Counter)
    routes: dict[str, str] = field(default_factory=dict)  # route id -> RM that answered
    acked: set[str] = field(default_factory=set)  # route ids in a feedback call that got 200
    sent_items: int = 0  # feedback items sent in calls that got 200 (duplicates included)
    applied: int = 0  # sum of "applied" in the answers
    duplicate: int = 0
    unknown: int = 0
    pending: int = 0  # trainer: items of a stalled step, resent by the next run
    retries: int = 0  # failed tries the loop waited out
    coped: list[str] = field(default_factory=list)
    steps_done: int = 0
    wall_s: float = 0.0


def reward_for(rm: str, key: str) -> float:
    """A stand-in for −DPO loss: around −log 2, a bit higher for ``length`` (deterministic)."""
    rng = np.random.default_rng([_h(rm), _h(key)])
    bonus = {"length": 0.05, "verifier": -0.02, "external": 0.0}[rm]
    return float(-np.log(2.0) + bonus + rng.normal(0.0, 0.03))


def _h(text: str) -> int:
    return int.from_bytes(text.encode()[-8:].rjust(8, b"\0"), "little") % 2**32


def driver_loop(
    cluster: FaultCluster,
    ns: str,
    *,
    steps: int,
    pairs_per_step: int = 6,
    route_on: Callable[[int], int] = lambda step: 0,
    feedback: str = "same",
    before_step: Callable[[int], None] | None = None,
    failover: bool = False,
    patience_s: float = 60.0,
) -> Ledger:
    """A training loop on the real client: per step one ``/v1/route`` call, then the −loss of
    every pair to ``/v1/feedback``, both with the trainer's patience (``with_patience``).

    ``feedback``: ``same`` (to the replica that routed), ``other`` (to the other replica),
    ``duplicate`` (each batch to both replicas at once, then again with every item twice),
    ``reorder`` (each step's feedback held back and sent after the next step's, items reversed).
    ``before_step(step)`` injects a fault. ``failover``: a failed try is tried again on the
    other replica (as a load balancer in front of both would), not on the same one.
    """
    from trainer_client import GatewayClient, RetryPolicy, Timeouts
    from trainer_client.online_dpo import GatewayStalled, with_patience

    led = Ledger()
    t0 = time.monotonic()
    retry = RetryPolicy(retries=2, base_s=0.2, max_s=1.0)
    clients = [
        GatewayClient(cluster.url(i), timeouts=Timeouts(connect=2.0, read=60.0), retry=retry)
        for i in range(2)
    ]

    def say(msg: str) -> None:
        led.retries += 1
        led.coped.append(re.sub(r"\[/?yellow\]", "", msg)[:300])

    def on(i: int, call: Callable[[Any], Any]) -> Callable[[], Any]:
        """``call(client)`` on replica ``i``; with failover, every other try on the other one."""
        tries = [0]

        def attempt() -> Any:
            j = (i + tries[0]) % 2 if failover else i
            tries[0] += 1
            return call(clients[j])

        return attempt

    def post(i: int, items: list[tuple[str, float]]) -> None:
        res, _ = with_patience(
            on(i, lambda c: c.feedback(items)),
            "feedback",
            url=cluster.url(i),
            patience_s=patience_s,
            say=say,
        )
        led.acked.update(r for r, _ in items)
        led.sent_items += len(items)
        led.applied += res.applied
        led.duplicate += res.duplicate
        led.unknown += res.unknown

    held: list[tuple[str, float]] = []
    try:
        for step in range(1, steps + 1):
            if before_step is not None:
                before_step(step)
            gw = route_on(step)
            batch = pairs(pairs_per_step, offset=step * pairs_per_step)
            failed_before = led.retries
            try:
                res, _ = with_patience(
                    on(gw, partial(_route, batch=batch, ns=ns)),
                    "route",
                    url=cluster.url(gw),
                    patience_s=patience_s,
                    say=say,
                )
            except GatewayStalled:
                led.pairs_unanswered += len(batch)
                led.coped.append(f"step {step}: route stalled past patience")
                continue
            if led.retries > failed_before:
                led.pairs_failed += len(batch)
            results = res.results
            led.pairs_answered += len(results)
            led.fallbacks += sum(r.fallback for r in results)
            led.by_rm.update(r.rm for r in results)
            for r in results:
                led.routes[r.route_id] = r.rm
            items = [(r.route_id, reward_for(r.rm, r.route_id)) for r in results]
            if feedback == "same":
                post(gw, items)
            elif feedback == "other":
                post(1 - gw, items)
            elif feedback == "duplicate":
                both = threading.Thread(target=post, args=(1 - gw, items))
                both.start()
                post(gw, items)
                both.join()
                post(1 - gw, [x for it in items for x in (it, it)])
            elif feedback == "reorder":
                if held:
                    post(gw, items[::-1])
                    post(1 - gw, held[::-1])
                    held = []
                else:
                    held = items
            else:
                raise ValueError(f"feedback: unknown mode {feedback!r}")
            led.steps_done = step
        if held:
            post(0, held[::-1])
    finally:
        for c in clients:
            c.close()
    led.wall_s = time.monotonic() - t0
    return led


def _route(client: Any, *, batch: list[dict[str, Any]], ns: str) -> Any:
    return client.route(batch, namespace=ns)


# ---- the real trainer process ------------------------------------------------------------------


def tiny_policy(root: Path) -> Path:
    from tests.tiny_models import tiny_llama

    path = root / "tiny-llama"
    if not (path / "config.json").exists():
        tiny_llama(path, seed=1)
    return path


def prompts_file(root: Path) -> Path:
    """Chat and math prompts (math with reference answers, for the verifier RM)."""
    return write_prompts(root / "prompts.jsonl")


@dataclass
class TrainRun:
    """One or more ``train-dpo`` invocations on one run folder (a resume continues it)."""

    out: Path
    returncodes: list[int] = field(default_factory=list)
    stderr: str = ""
    wall_s: float = 0.0
    pid: int | None = None  # of the running invocation (a watcher may pause it)

    def log(self) -> list[dict[str, Any]]:
        path = self.out / "log.jsonl"
        if not path.exists():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln]

    def summary(self) -> dict[str, Any]:
        path = self.out / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def state(self) -> dict[str, Any]:
        path = self.out / "checkpoint" / "trainer_state.json"
        return json.loads(path.read_text()) if path.exists() else {}


def train_dpo(
    cluster: FaultCluster,
    run: TrainRun,
    ns: str,
    *,
    steps: int,
    gateway: int = 0,
    patience_s: float = 120.0,
    resume: bool = False,
    watch: Callable[[int, str], None] | None = None,
    timeout_s: float = 600.0,
) -> int:
    """Run ``python -m trainer_client`` (= ``reward-router train-dpo``) to the end;
    ``watch(steps_logged, stderr_so_far)`` is called every 0.1 s while it runs."""
    policy = tiny_policy(cluster.root)
    prompts = prompts_file(cluster.root)
    args = [
        sys.executable, "-m", "trainer_client",
        "--gateway", cluster.url(gateway), "--policy", str(policy), "--prompts", str(prompts),
        "--out", str(run.out), "--namespace", ns, "--steps", str(steps),
        "--prompts-per-step", "2", "-k", "3", "--max-new-tokens", "8", "--lr", "1e-2",
        "--save-every", "1", "--torch-threads", "1", "--gateway-patience-s", str(patience_s),
    ]  # fmt: skip
    if resume:
        args.append("--resume")
    err_path = cluster.root / f"train-{ns}-{len(run.returncodes)}.err"
    t0 = time.monotonic()
    with err_path.open("wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        run.pid = proc.pid
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"train-dpo did not finish in {timeout_s}s")
                if watch is not None:
                    watch(len(run.log()), err_path.read_text(errors="replace"))
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    run.wall_s += time.monotonic() - t0
    run.returncodes.append(proc.returncode)
    run.stderr += err_path.read_text(errors="replace")
    return int(proc.returncode)


def trainer_ledger(run: TrainRun) -> Ledger:
    """The trainer's own persisted books: ``log.jsonl`` per step and the checkpoint's totals.

    ``log.jsonl`` has no route ids, so ``acked`` stays empty; the counts are what there is.
    """
    led = Ledger()
    for rec in run.log():
        led.pairs_answered += rec.get("routed", 0)
        led.fallbacks += rec.get("fallbacks", 0)
        led.by_rm.update(rec.get("rm_counts") or {})
        fb = rec.get("feedback") or {}
        led.applied += fb.get("applied", 0)
        led.duplicate += fb.get("duplicate", 0)
        led.unknown += fb.get("unknown", 0)
        led.pending += fb.get("pending", 0)  # a stalled step: its feedback went to disk
        led.steps_done = max(led.steps_done, rec["step"])
    led.retries = run.stderr.count("retrying in")
    led.wall_s = run.wall_s
    return led


# ---- the audit ---------------------------------------------------------------------------------


@dataclass
class Audit:
    """The gateway side of the books for one namespace, and how it compares."""

    namespace: str
    log_entries: int
    log_route_ids: list[str]
    log_duplicates: int  # route ids present more than once in the log (must be 0)
    observations: list[int]  # per replica: sum over RMs of /v1/posteriors observations
    seq: list[int]  # per replica
    per_rm_obs: list[dict[str, int]]  # per replica
    per_rm_log: dict[str, int]
    routes_recorded: dict[str, int]  # route records written per RM (/v1/posteriors routes)
    posterior_diff: float  # max abs (means, eta, precision) replica vs the undisturbed fold
    replica_diff: float  # max abs between the two replicas
    lost: int = 0  # acknowledged, not in the log
    unacked_applied: int = 0  # in the log, never acknowledged to the loop
    checked_ids: bool = False

    def ok(self) -> bool:
        return (
            self.log_duplicates == 0
            and self.lost == 0
            and self.unacked_applied == 0
            and all(o == self.log_entries for o in self.observations)
            and all(s == self.log_entries for s in self.seq)
            and all(d == self.per_rm_log for d in self.per_rm_obs)
            and self.posterior_diff <= 1e-9
            and self.replica_diff <= 1e-9
        )


def read_log(cluster: FaultCluster, ns: str) -> tuple[dict[str, Any], list[Any]]:
    """The namespace's config and its observation log, straight from Redis."""
    import redis

    from gateway.keys import Keys
    from gateway.store import decode_entry

    keys = Keys(PREFIX)
    r = redis.Redis(host="127.0.0.1", port=cluster.redis.port)
    try:
        gen_b, config_b = r.hmget(keys.meta(ns), "gen", "config")
        if not isinstance(gen_b, bytes) or not isinstance(config_b, bytes):
            raise AssertionError(f"namespace {ns} not in Redis")
        gen = gen_b.decode()
        entries: list[bytes] = list(r.lrange(keys.log(ns, gen), 0, -1))  # type: ignore[arg-type]
    finally:
        r.close()
    obs = [decode_entry(i + 1, e, ns, gen) for i, e in enumerate(entries)]
    return json.loads(config_b), obs


def undisturbed_posterior(router: Path, config: dict[str, Any], obs: Sequence[Any]) -> Any:
    """The posterior of the namespace's policy after folding ``obs`` one at a time, in log
    order, from the prior, through a fresh normaliser: no batching, no restart, no snapshot."""
    from gateway.offline.model import OfflineRouter
    from gateway.policy_setup import make_normalizer, prior_kwargs, reward_link
    from gateway.routing import make_policy
    from gateway.routing.fold import fold

    loaded = OfflineRouter.load(router)
    params = dict(config.get("params") or {})
    policy = make_policy(
        config["policy"],
        n_rms=len(config["rms"]),
        dim=int(config["dim"]),
        rng=np.random.default_rng(0),
        **prior_kwargs(loaded),
        **params,
    )
    link = reward_link(config, loaded)
    norm = make_normalizer(config["normalizer"], dict(config.get("normalizer_params") or {}))
    # The gateway's own fold rule, applied one observation per call: no batching to agree with.
    for o in obs:
        fold(policy, norm, link, np.array([o.reward]), np.array([o.arm]), o.h[None, :],
             per_item=True)  # fmt: skip
    return policy.posteriors  # type: ignore[attr-defined]


def _params(url: str, ns: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/posteriors", params={"namespace": ns, "detail": "full"}, timeout=60)
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


def _maxdiff(p: dict[str, Any], q: dict[str, Any]) -> float:
    return max(
        float(np.max(np.abs(np.asarray(p[k], dtype=float) - np.asarray(q[k], dtype=float))))
        for k in ("means", "eta", "precision")
    )


def audit(cluster: FaultCluster, ns: str, led: Ledger | None = None) -> Audit:
    """Compare the log, both replicas' posteriors and the loop's ledger for ``ns``."""
    config, obs = read_log(cluster, ns)
    ids = [o.route_id for o in obs]
    names = list(config["rms"])
    per_rm_log = {n: 0 for n in names}
    for o in obs:
        per_rm_log[names[o.arm]] += 1
    post = undisturbed_posterior(cluster.router, config, obs)
    ref = {
        "means": post.means().tolist(),
        "eta": post.eta.tolist(),
        "precision": post.precision.tolist(),
    }
    answers = [_params(g.url, ns) for g in cluster.gateways]
    out = Audit(
        namespace=ns,
        log_entries=len(obs),
        log_route_ids=ids,
        log_duplicates=len(ids) - len(set(ids)),
        observations=[sum(r["observations"] for r in a["rms"]) for a in answers],
        seq=[int(a["seq"]) for a in answers],
        per_rm_obs=[{r["name"]: r["observations"] for r in a["rms"]} for a in answers],
        per_rm_log=per_rm_log,
        routes_recorded={r["name"]: r["routes"] for r in answers[0]["rms"]},
        posterior_diff=max(_maxdiff(a["params"], ref) for a in answers),
        replica_diff=_maxdiff(answers[0]["params"], answers[1]["params"]),
    )
    if led is not None and led.acked:
        out.checked_ids = True
        out.lost = len(led.acked - set(ids))
        out.unacked_applied = len(set(ids) - led.acked)
    return out


# ---- a scenario's result -----------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    loop: str  # "train-dpo" | "driver"
    ledger: Ledger
    audit: Audit
    what: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def acked(self) -> int:
        """Feedback acknowledged: distinct route ids the loop got a 200 for (driver), or the
        trainer's own books (applied + duplicate of every step and of what it resent)."""
        if self.ledger.acked:
            return len(self.ledger.acked)
        return self.ledger.applied + self.ledger.duplicate

    def row(self) -> dict[str, Any]:
        a, led = self.audit, self.ledger
        return {
            "scenario": self.scenario,
            "loop": self.loop,
            "steps": led.steps_done,
            "pairs_answered": led.pairs_answered,
            "pairs_failed": led.pairs_failed,
            "pairs_unanswered": led.pairs_unanswered,
            "fallbacks": led.fallbacks,
            "retries": led.retries,
            "feedback_acked": self.acked,
            "applied_in_answers": led.applied,
            "duplicate_in_answers": led.duplicate,
            "unknown_in_answers": led.unknown,
            "log_entries": a.log_entries,
            "observations": a.observations,
            "lost": a.lost,
            "unacked_applied": a.unacked_applied,
            "log_duplicates": a.log_duplicates,
            "orphan_routes": sum(a.routes_recorded.values()) - a.log_entries,
            "posterior_max_abs_diff": a.posterior_diff,
            "replica_max_abs_diff": a.replica_diff,
            "ok": a.ok() and self.acked == a.log_entries and self.extra.get("books_agree", True),
            "wall_s": round(led.wall_s, 1),
            "what": self.what,
            **self.extra,
        }


# ---- the scenarios ----------------------------------------------------------------------------

#: Every scenario's namespace config: a wide prior (lambda0 0.1) and plain Thompson draws from
#: the first pair (no plausibility gate, no exploration ramp) so the first draws spread over
#: the three RMs, and a short normaliser warm-up so short runs already normalise by rank (which
#: makes the posterior depend on the order of the log: the property the audit checks).
NS_CONFIG: dict[str, Any] = {
    "policy": "bayesian",
    "params": {"lambda0": 0.1, "explore_z": None, "stationary_z": None, "explore_ramp": 0.0},
    "normalizer": "quantile",
    "normalizer_params": {"window": 64, "warmup": 8},
}


def new_namespace(cluster: FaultCluster, name: str) -> str:
    """A fresh namespace (unique per run of the cluster) created with :data:`NS_CONFIG`."""
    cluster.namespaces += 1
    ns = f"{name}-{cluster.namespaces}"
    r = httpx.post(f"{cluster.url(0)}/v1/namespaces/{ns}", json=NS_CONFIG, timeout=30)
    if r.status_code != 200:
        raise AssertionError(f"create {ns}: {r.status_code} {r.text}")
    return ns


def resent(stderr: str) -> tuple[int, int]:
    """(applied, duplicate) of feedback a run resent from ``pending_feedback.json``."""
    applied = dup = 0
    for m in re.finditer(r"pending feedback: \{'applied': (\d+), 'duplicate': (\d+)", stderr):
        applied += int(m.group(1))
        dup += int(m.group(2))
    return applied, dup


def _train_result(
    cluster: FaultCluster, scenario: str, run: TrainRun, ns: str, what: str, **extra: Any
) -> Result:
    led = trainer_ledger(run)
    applied, dup = resent(run.stderr)
    led.applied += applied
    led.duplicate += dup
    totals = run.state().get("totals", {})
    # The checkpoint's totals are the trainer's other persisted book: they must agree with
    # log.jsonl plus what was resent (routed pairs, delivered feedback).
    delivered = totals.get("feedback_applied", 0) + totals.get("feedback_duplicate", 0)
    extra = {
        "resent": applied + dup,
        "returncodes": run.returncodes,
        "totals_routed": totals.get("routed"),
        "totals_delivered": delivered,
        "books_agree": totals.get("routed") == led.pairs_answered
        and delivered == led.applied + led.duplicate
        and led.pending == applied + dup,
        **extra,
    }
    return Result(scenario, "train-dpo", led, audit(cluster, ns), what, extra)


def rm_kill(cluster: FaultCluster, *, steps: int = 4) -> list[Result]:
    """train-dpo; the ``length`` RM is killed -9 while step 1's route call is being served (its
    route records are in Redis) and started again (same port) once step ``steps - 1`` is
    logged, so steps 2 to ``steps - 1`` certainly routed with it dead: the pairs whose draw
    named it fall back to another RM."""
    ns = new_namespace(cluster, "rm-kill")
    run = TrainRun(cluster.root / ns)
    back_at = max(2, steps - 1)
    done: set[str] = set()

    def kill() -> None:
        cluster.kill_rm("length")
        done.add("kill")

    killer = when_routes_stored(cluster, ns, kill, timeout_s=600)

    def watch(logged: int, _err: str) -> None:
        if "kill" in done and "noticed" not in done and rm_available(cluster, 0, "length") is False:
            done.add("noticed")  # replica 0's health check saw it down
        if logged >= back_at and "back" not in done:
            cluster.start_rm("length")
            done.add("back")

    rc = train_dpo(cluster, run, ns, steps=steps, watch=watch)
    killer.join()
    down = [rec for rec in run.log() if 2 <= rec["step"] <= back_at]
    answered_by_dead = sum((rec.get("rm_counts") or {}).get("length", 0) for rec in down)
    fallbacks_while_down = sum(rec.get("fallbacks", 0) for rec in down)
    what = (
        f"exit {rc}; killed during step 1's route; steps 2-{back_at} routed with it dead: "
        f"{fallbacks_while_down} pairs fell back to another RM, {answered_by_dead} answered "
        f"by length"
    )
    return [
        _train_result(
            cluster, "rm-kill", run, ns, what, answered_by_dead_rm=answered_by_dead,
            fallbacks_while_down=fallbacks_while_down, noticed="noticed" in done,
        )
    ]  # fmt: skip


def gateway_kill_trainer(cluster: FaultCluster, *, steps: int = 5) -> Result:
    """train-dpo on replica 0. Outage 1: killed -9 after step 1, restarted once the trainer
    says it is retrying (patience 120 s). Outage 2: killed -9 the moment the trainer writes a
    later step's feedback to disk to post it, and left down past its patience (6 s): exit 3
    with a checkpoint; restarted; ``--resume`` resends the pending feedback and finishes."""
    ns = new_namespace(cluster, "gw-kill")
    run = TrainRun(cluster.root / ns)
    first = 2
    done: set[str] = set()

    def watch(logged: int, err: str) -> None:
        if logged >= 1 and "kill" not in done:
            cluster.kill_gateway(0)
            done.add("kill")
        elif "kill" in done and "back" not in done and "retrying in" in err:
            cluster.start_gateway(0)  # the trainer is waiting on it: bring it back
            done.add("back")

    rc1 = train_dpo(cluster, run, ns, steps=first, patience_s=120, watch=watch)

    pending = run.out / "pending_feedback.json"
    hit = {"where": ""}
    stop = threading.Event()

    def sniper() -> None:
        # Kill the replica as soon as a step's feedback is on disk and being posted; if that
        # window (milliseconds) is missed, kill it when the next step lands in the log.
        logged = len(run.log())
        while not stop.is_set():
            if pending.exists():
                cluster.kill_gateway(0)
                hit["where"] = "posting feedback"
                return
            if len(run.log()) > logged:
                cluster.kill_gateway(0)
                hit["where"] = "between steps"
                return
            time.sleep(0.0005)

    sniping = threading.Thread(target=sniper, daemon=True)

    def watch2(logged: int, _err: str) -> None:
        if logged >= first + 1 and not sniping.is_alive() and not hit["where"]:
            sniping.start()

    rc2 = train_dpo(cluster, run, ns, steps=steps, patience_s=6, resume=True, watch=watch2)
    stop.set()
    cluster.start_gateway(0)
    rc3 = train_dpo(cluster, run, ns, steps=steps, patience_s=120, resume=True)
    applied, dup = resent(run.stderr)
    what = (
        f"outage 1: trainer retried until the replica was back (exit {rc1}); outage 2 "
        f"(kill while {hit['where'] or '-'}): exit {rc2} with a checkpoint, then --resume "
        f"(exit {rc3}) resent {applied + dup} pending items ({applied} applied, {dup} duplicate)"
    )
    return _train_result(cluster, "gateway-kill", run, ns, what, outage2=hit["where"])


def when_routes_stored(
    cluster: FaultCluster, ns: str, action: Callable[[], None], timeout_s: float = 60.0
) -> threading.Thread:
    """A thread that runs ``action`` the moment new route records of ``ns`` appear in Redis,
    i.e. while a ``/v1/route`` call is being served (records are written while the RMs work,
    before the answer goes out)."""
    import redis

    from gateway.keys import Keys

    keys = Keys(PREFIX)
    r = redis.Redis(host="127.0.0.1", port=cluster.redis.port)
    gen = r.hget(keys.meta(ns), "gen")
    assert isinstance(gen, bytes), ns
    key = keys.routes(ns, gen.decode())

    def total() -> int:
        return sum(int(v) for v in r.hvals(key))

    start = total()

    def run() -> None:
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and total() == start:
                time.sleep(0.001)
            action()
        finally:
            r.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def gateway_kill_driver(cluster: FaultCluster, *, steps: int = 8) -> Result:
    """Driver loop on replica 0; replica 0 is killed -9 while it serves step 3's route call
    (its route records are in Redis, its answer not yet out) and started again before step
    ``steps - 1``; every failed try goes to replica 1 (failover)."""
    ns = new_namespace(cluster, "gw-kill-drv")

    def before(step: int) -> None:
        if step == 3:
            when_routes_stored(cluster, ns, lambda: cluster.kill_gateway(0))
        if step == steps - 1:
            cluster.start_gateway(0)

    led = driver_loop(cluster, ns, steps=steps, before_step=before, failover=True)
    a = audit(cluster, ns, led)
    orphans = sum(a.routes_recorded.values()) - a.log_entries
    what = (
        f"killed while serving step 3's route; {led.retries} failed tries went to replica 1; "
        f"{orphans} orphan route records (routed, answer lost, never fed back); "
        f"{led.duplicate} feedback items answered duplicate"
    )
    return Result("gateway-kill", "driver", led, a, what, {"orphans": orphans})


def gateway_kill(cluster: FaultCluster, *, steps: int = 5) -> list[Result]:
    return [gateway_kill_trainer(cluster, steps=steps), gateway_kill_driver(cluster)]


def redis_restart_trainer(cluster: FaultCluster, *, steps: int = 4) -> Result:
    """train-dpo; Redis killed -9 and restarted at once after step 1, and again after step 2
    left down 15 s (far longer than the replicas' reconnect back-off of ~5 s, so a call made
    up to ~10 s into the outage is answered 503 and the trainer has to wait)."""
    ns = new_namespace(cluster, "redis")
    run = TrainRun(cluster.root / ns)
    done: set[int] = set()

    def watch(logged: int, _err: str) -> None:
        # The trainer is held (SIGSTOP) until Redis is dead: in restart 2 its next route or
        # feedback call lands in the 15 s outage, however fast the machine runs the steps.
        if logged >= 1 and 1 not in done:
            done.add(1)
            cluster.restart_redis(hold=run.pid)
        if logged >= 2 and 2 not in done and steps > 2:
            done.add(2)
            cluster.restart_redis(down_s=15.0, hold=run.pid)

    rc = train_dpo(cluster, run, ns, steps=steps, watch=watch)
    waits = run.stderr.count("retrying in")
    what = (
        f"exit {rc}; restart 1 (instant) unseen by the trainer or retried; restart 2 (15 s "
        f"down): the trainer waited it out ({waits} retries logged)"
    )
    return _train_result(cluster, "redis-restart", run, ns, what)


def redis_restart_driver(cluster: FaultCluster, *, steps: int = 6) -> Result:
    """Driver loop; Redis killed -9 while step 3's route is served, back 0.5 s later."""
    ns = new_namespace(cluster, "redis-drv")
    threads: list[threading.Thread] = []

    def before(step: int) -> None:
        if step == 3:
            threads.append(
                when_routes_stored(cluster, ns, lambda: cluster.restart_redis(down_s=0.5))
            )

    led = driver_loop(cluster, ns, steps=steps, before_step=before)
    for t in threads:
        t.join()
    a = audit(cluster, ns, led)
    what = (
        f"killed while serving step 3's route, down 0.5 s; {led.retries} failed tries "
        f"retried; {led.duplicate} feedback items answered duplicate"
    )
    return Result("redis-restart", "driver", led, a, what)


def redis_restart(cluster: FaultCluster, *, steps: int = 4) -> list[Result]:
    return [redis_restart_trainer(cluster, steps=steps), redis_restart_driver(cluster)]


def bad_rm(cluster: FaultCluster, mode: str, *, steps: int = 6) -> list[Result]:
    """Driver loop; the external RM answers ``mode`` (slow: 4 s, past the replicas' 1.5 s read
    timeout; garbage: a malformed 200) from step 2 to step ``steps - 1``."""
    ns = new_namespace(cluster, f"{mode}-rm")
    before_stats = cluster.external_stats()

    def before(step: int) -> None:
        if step == 2:
            cluster.set_external(mode)
        if step == steps:
            cluster.set_external("ok")

    t0 = time.monotonic()
    led = driver_loop(cluster, ns, steps=steps, before_step=before)
    wall = time.monotonic() - t0
    stats = cluster.external_stats()
    bad_pairs = stats["pairs"].get(mode, 0) - before_stats["pairs"].get(mode, 0)
    bad_calls = stats["calls"].get(mode, 0) - before_stats["calls"].get(mode, 0)
    a = audit(cluster, ns, led)
    what = (
        f"while {mode} the external RM got {bad_calls} calls ({bad_pairs} pairs), each pair "
        f"fell back to another RM; {led.fallbacks} fallbacks in all (cooldown skips included), "
        f"{led.by_rm.get('external', 0)} pairs answered by it; {wall:.1f} s for {steps} steps"
    )
    extra = {"bad_pairs": bad_pairs, "bad_calls": bad_calls}
    return [Result(f"{mode}-rm", "driver", led, a, what, extra)]


def slow_rm(cluster: FaultCluster, *, steps: int = 12) -> list[Result]:
    return bad_rm(cluster, "slow", steps=steps)


def garbage_rm(cluster: FaultCluster, *, steps: int = 12) -> list[Result]:
    return bad_rm(cluster, "garbage", steps=steps)


def feedback_dup(cluster: FaultCluster, *, steps: int = 5) -> list[Result]:
    """Every step's feedback to both replicas at once, then again with each item twice."""
    ns = new_namespace(cluster, "fb-dup")
    led = driver_loop(cluster, ns, steps=steps, feedback="duplicate")
    what = f"each item sent 4 times: {led.applied} applied, {led.duplicate} duplicate"
    return [Result("feedback-dup", "driver", led, audit(cluster, ns, led), what)]


def feedback_reorder(cluster: FaultCluster, *, steps: int = 8) -> list[Result]:
    """Each step's feedback held back, sent after the next step's, items reversed, to the
    other replica; the posterior is compared with the log-order fold and the route-order one."""
    ns = new_namespace(cluster, "fb-reorder")
    led = driver_loop(cluster, ns, steps=steps, feedback="reorder")
    a = audit(cluster, ns, led)
    config, obs = read_log(cluster, ns)
    order = {rid: i for i, rid in enumerate(led.routes)}
    in_route_order = undisturbed_posterior(
        cluster.router, config, sorted(obs, key=lambda o: order[o.route_id])
    )
    in_log_order = undisturbed_posterior(cluster.router, config, obs)
    diff = float(np.max(np.abs(in_route_order.means() - in_log_order.means())))
    what = (
        f"log order differs from route order; vs a fold in route order the means differ by "
        f"{diff:.2g} (the quantile normaliser ranks each reward among those before it)"
    )
    return [Result("feedback-reorder", "driver", led, a, what, {"route_order_diff": diff})]


def feedback_other_replica(cluster: FaultCluster, *, steps: int = 6) -> list[Result]:
    """Routes alternate between the replicas; each step's feedback goes to the other one."""
    ns = new_namespace(cluster, "fb-other")
    led = driver_loop(cluster, ns, steps=steps, route_on=lambda s: s % 2, feedback="other")
    what = "route on one replica, feedback on the other, alternating"
    return [Result("feedback-other-replica", "driver", led, audit(cluster, ns, led), what)]


SCENARIOS: dict[str, Callable[..., list[Result]]] = {
    "rm-kill": rm_kill,
    "gateway-kill": gateway_kill,
    "redis-restart": redis_restart,
    "slow-rm": slow_rm,
    "garbage-rm": garbage_rm,
    "feedback-dup": feedback_dup,
    "feedback-reorder": feedback_reorder,
    "feedback-other-replica": feedback_other_replica,
}
