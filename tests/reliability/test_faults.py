"""Faults during a running training loop against a real cluster (tests/reliability/faults.py):
an RM killed -9 and restarted, a gateway replica killed -9 (with a request in flight) and
restarted, Redis killed -9 and restarted, an RM that answers too slowly or with garbage, and
feedback duplicated, reordered or sent to the other replica.

Each test asserts the books balance: every acknowledged feedback is in Redis's observation log
exactly once (and nothing unacknowledged is), both replicas' observation counts equal the log,
per RM, and both replicas' posteriors equal the one rebuilt undisturbed from the same applied
feedback (to 1e-9), and the loop finished. The real ``train-dpo`` process (tiny random Llama)
runs the RM kill here and the gateway kill and Redis restart in the slow tests.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability import faults as F
from tests.reliability.faults import FaultCluster, Result


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    with F.cluster_running(tmp_path_factory.mktemp("faults")) as c:
        yield c


@pytest.fixture
def healed(cluster: FaultCluster) -> Iterator[FaultCluster]:
    """The cluster, healed after the test (every process up, the external RM well-behaved)."""
    try:
        yield cluster
    finally:
        cluster.heal()


def assert_books_balance(r: Result) -> None:
    a = r.audit
    assert a.log_duplicates == 0, "a route id was applied twice"
    assert a.lost == 0, "acknowledged feedback is missing from the log"
    assert a.unacked_applied == 0, "the log holds feedback the loop never had acknowledged"
    assert r.acked == a.log_entries > 0, (r.acked, a.log_entries)
    assert a.observations == [a.log_entries, a.log_entries], a.observations
    assert a.seq == [a.log_entries, a.log_entries]
    assert a.per_rm_obs == [a.per_rm_log, a.per_rm_log]
    assert a.posterior_diff <= 1e-9, a.posterior_diff
    assert a.replica_diff <= 1e-9, a.replica_diff
    assert r.ledger.pairs_unanswered == 0
    if r.ledger.acked:  # driver: nothing left unacknowledged, no item refused
        assert set(r.ledger.routes) == r.ledger.acked
        assert r.ledger.unknown == 0


# ---- RM killed -9 during train-dpo -------------------------------------------------------------


def test_rm_killed_during_train_dpo(healed: FaultCluster) -> None:
    cluster = healed
    (r,) = F.rm_kill(cluster, steps=3)
    assert r.extra["noticed"], "the replicas never saw the RM down"
    assert r.extra["returncodes"] == [0]
    assert r.ledger.steps_done == 3
    assert r.extra["answered_by_dead_rm"] == 0  # no pair was labelled by the dead RM
    assert r.extra["books_agree"]
    assert_books_balance(r)
    # The RM is back: both replicas see it available again.
    cluster.wait_rms_available()


# ---- gateway replica killed -9 --------------------------------------------------------------


def test_gateway_killed_while_serving_a_route(healed: FaultCluster) -> None:
    cluster = healed
    old_pid = cluster.gateways[0].popen.pid
    r = F.gateway_kill_driver(cluster, steps=6)
    assert cluster.gateways[0].popen.pid != old_pid  # it was killed and started again
    assert r.ledger.retries > 0  # the loop saw the dead replica and went to the other one
    assert r.ledger.pairs_answered == 6 * 6
    assert_books_balance(r)  # includes: the restarted replica rebuilt the same posterior


@pytest.mark.slow
def test_gateway_killed_during_train_dpo_retry_then_exit_3_and_resume(
    healed: FaultCluster,
) -> None:
    r = F.gateway_kill_trainer(healed, steps=5)
    assert r.extra["returncodes"] == [0, 3, 0]
    assert r.ledger.retries > 0
    assert r.ledger.steps_done == 5
    assert r.extra["books_agree"], r.row()
    assert_books_balance(r)


# ---- Redis killed -9 and restarted ------------------------------------------------------------


def test_redis_killed_while_serving_a_route(healed: FaultCluster) -> None:
    cluster = healed
    old_pid = cluster.redis.popen.pid
    r = F.redis_restart_driver(cluster, steps=6)
    assert cluster.redis.popen.pid != old_pid
    assert r.ledger.pairs_answered == 6 * 6
    # Everything acknowledged before the kill is still in the log (AOF, appendfsync always).
    assert_books_balance(r)


@pytest.mark.slow
def test_redis_restarted_during_train_dpo(healed: FaultCluster) -> None:
    r = F.redis_restart_trainer(healed, steps=4)
    assert r.extra["returncodes"] == [0]
    assert r.ledger.steps_done == 4
    assert r.ledger.retries > 0  # 15 s down: the replicas answered 503 and the trainer waited
    assert r.extra["books_agree"]
    assert_books_balance(r)


# ---- an RM too slow, or answering garbage -----------------------------------------------------


@pytest.mark.parametrize("mode", ["slow", "garbage"])
def test_misbehaving_rm_falls_back(healed: FaultCluster, mode: str) -> None:
    (r,) = F.bad_rm(healed, mode, steps=6)
    assert r.extra["bad_pairs"] > 0, "the external RM was never asked while misbehaving"
    assert r.ledger.fallbacks >= r.extra["bad_pairs"]
    assert r.ledger.pairs_answered == 6 * 6
    assert_books_balance(r)


@pytest.fixture
def stand_in(cluster: FaultCluster) -> Iterator[str]:
    """A separate stand-in RM process (its own mode), stopped after the test."""
    from tests.procs import free_port, start_process

    port = free_port()
    args = [sys.executable, "-m", "tests.reliability.stand_in_rm", "--port", str(port)]
    proc = start_process(args, port, ready_url=f"http://127.0.0.1:{port}/readyz")
    try:
        yield proc.url
    finally:
        proc.kill(signal.SIGKILL)


@pytest.mark.parametrize("mode", ["slow", "garbage"])
async def test_passing_health_check_does_not_reset_failed_calls(stand_in: str, mode: str) -> None:
    """Regression: a passing /readyz used to clear the count of failed calls, so an RM that is
    up but times out (or answers garbage) never reached its cooldown when health checks ran
    between calls, and every pair routed to it paid the full read timeout."""
    from gateway.rm_client import RMClient, RMUnavailable

    httpx.post(f"{stand_in}/mode", json={"mode": mode, "delay_s": 2.0}).raise_for_status()
    client = RMClient("ext", stand_in, read_timeout_s=0.3, failure_threshold=2, cooldown_s=60)
    pair = {"prompt": "2+2?", "response_a": "4", "response_b": "five"}
    try:
        with pytest.raises(RMUnavailable):
            await client.compare([pair])
        assert await client.check_health()  # the process is up and says so
        assert client.available() and client.consecutive_failures == 1
        with pytest.raises(RMUnavailable):
            await client.compare([pair])
        assert client.in_cooldown() and not client.available()
        # It recovers: after the cooldown one successful call clears the count.
        httpx.post(f"{stand_in}/mode", json={"mode": "ok"}).raise_for_status()
        client.cooldown_until = 0.0  # the cooldown is over (no waiting 60 s in a test)
        assert (await client.compare([pair]))[0].preferred == "a"
        assert client.consecutive_failures == 0 and client.available()
    finally:
        await client.aclose()


# ---- feedback duplicated, reordered, sent to the other replica ------------------------------


def test_feedback_duplicated_across_replicas(cluster: FaultCluster) -> None:
    (r,) = F.feedback_dup(cluster, steps=4)
    n = r.ledger.pairs_answered
    assert r.ledger.applied == n and r.ledger.duplicate == 3 * n  # each item sent 4 times
    assert_books_balance(r)


def test_feedback_reordered(cluster: FaultCluster) -> None:
    (r,) = F.feedback_reorder(cluster, steps=6)
    log_ids = r.audit.log_route_ids
    assert log_ids != list(r.ledger.routes)  # the log order is not the route order
    # Past the normaliser's warm-up the order matters; the replicas still agree, because
    # both fold the log in its order (assert_books_balance compares them to that fold).
    assert r.extra["route_order_diff"] > 1e-6
    assert_books_balance(r)


def test_feedback_sent_to_the_other_replica(cluster: FaultCluster) -> None:
    (r,) = F.feedback_other_replica(cluster, steps=4)
    assert r.ledger.applied == r.ledger.pairs_answered
    assert_books_balance(r)


# ---- the trainer's books when it stalls posting feedback ----------------------------------------


class FeedbackCut(httpx.BaseTransport):
    """A network that carries everything but ``/v1/feedback`` while ``cut`` is set (stands in
    for a gateway lost between a step's route and its feedback, deterministically)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.cut = True

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.cut and request.url.path == "/v1/feedback":
            raise httpx.ConnectError("network cut", request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_trainer_stalled_posting_feedback_keeps_its_books(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    """Regression: a run that stopped (exit 3) while posting a step's feedback checkpointed the
    step but left it out of log.jsonl and out of the routed totals, so after ``--resume`` the
    summary said fewer pairs routed than feedback applied."""
    from trainer_client import GatewayClient, RetryPolicy
    from trainer_client.online_dpo import GatewayStalled, OnlineDPOConfig, OnlineDPOTrainer

    ns = F.new_namespace(cluster, "stall-books")
    cfg = OnlineDPOConfig(
        gateway=cluster.url(0),
        out_dir=tmp_path / "run",
        policy=str(F.tiny_policy(cluster.root)),
        prompts=str(F.prompts_file(cluster.root)),
        namespace=ns,
        steps=2,
        prompts_per_step=2,
        samples_per_prompt=3,
        max_new_tokens=8,
        gateway_patience_s=1.0,
        torch_threads=1,
        save_every=1,
    )
    net = FeedbackCut()
    client = GatewayClient(cluster.url(0), retry=RetryPolicy(retries=0), transport=net)
    stalled = OnlineDPOTrainer(cfg, client=client, say=lambda m: None)
    with pytest.raises(GatewayStalled):
        stalled.run()
    stalled.close()
    out = tmp_path / "run"
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == [1]
    routed = log[0]["routed"]
    assert routed > 0 and log[0]["feedback"] == {"pending": routed}
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["totals"]["routed"] == routed
    assert len(json.loads((out / "pending_feedback.json").read_text())) == routed

    resumed = OnlineDPOTrainer(cfg.model_copy(update={"resume": True}), say=lambda m: None)
    summary: dict[str, Any] = resumed.run()
    resumed.close()
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == [1, 2]
    assert summary["routed"] == sum(rec["routed"] for rec in log)
    assert summary["feedback_applied"] + summary["feedback_duplicate"] == summary["routed"]
    a = F.audit(cluster, ns)
    assert a.log_entries == summary["routed"] and a.log_duplicates == 0
    assert a.observations == [a.log_entries, a.log_entries]
    assert a.posterior_diff <= 1e-9
