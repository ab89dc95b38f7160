"""The Online DPO trainer process end to end: real gateway + real RM services + real Redis +
the trainer as a child process with a tiny random Llama policy built in the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from tests.procs import free_port


def _train(gateway: str, policy: Path, prompts: Path, out: Path, *extra: str) -> str:
    args = [
        sys.executable, "-m", "trainer_client",
        "--gateway", gateway, "--policy", str(policy), "--prompts", str(prompts),
        "--out", str(out), "--prompts-per-step", "2", "-k", "3", "--max-new-tokens", "12",
        "--lr", "1e-2", "--save-every", "1", "--torch-threads", "1", *extra,
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stderr


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]


def _observations(gateway: str, ns: str) -> dict[str, int]:
    r = httpx.get(f"{gateway}/v1/posteriors", params={"namespace": ns}, timeout=30)
    assert r.status_code == 200, r.text
    return {rm["name"]: rm["observations"] for rm in r.json()["rms"]}


def test_three_steps_route_train_feedback_and_resume(
    trainer_gateway: str, tiny_policy: Path, prompts_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    ns = "e2e-dpo"
    _train(trainer_gateway, tiny_policy, prompts_file, out, "--steps", "2", "--namespace", ns)
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2]
    routed = sum(r["routed"] for r in log)
    assert routed > 0
    # every routed pair was labelled by one of the RMs and its feedback applied once
    assert all(r["feedback"]["applied"] == r["routed"] for r in log)
    assert all(sum(sum(v.values()) for v in r["rm_by_domain"].values()) == r["routed"] for r in log)
    # the per-RM mean rewards average back to the step's mean reward
    for r in log:
        weighted = sum(r["reward_by_rm"][rm] * n for rm, n in r["rm_counts"].items())
        assert abs(weighted / r["routed"] - r["mean_reward"]) < 1e-9
    assert sum(_observations(trainer_gateway, ns).values()) == routed
    assert not (out / "pending_feedback.json").exists()

    # resume to step 3: same namespace, the log continues, counts keep growing
    _train(trainer_gateway, tiny_policy, prompts_file, out, "--steps", "3", "--resume")
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    routed = sum(r["routed"] for r in log)
    assert sum(_observations(trainer_gateway, ns).values()) == routed
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["namespace"] == ns
    assert state["totals"]["routed"] == routed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["feedback_unknown"] == 0 and summary["feedback_applied"] == routed
    shares = summary["routing_share"]
    assert set(shares) <= {"length", "verifier"} and abs(sum(shares.values()) - 1) < 1e-9

    # the policy's weights changed from the initial ones
    before = load_file(str(tiny_policy / "model.safetensors"))
    after = load_file(str(out / "checkpoint" / "model.safetensors"))
    changed = [k for k in after if k in before and not (after[k] == before[k]).all()]
    assert changed, "no weight changed after 3 DPO steps"
    # the checkpoint is a loadable Hugging Face folder
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out / "checkpoint"))


def test_refuses_to_overwrite_a_run_without_resume(
    trainer_gateway: str, tiny_policy: Path, prompts_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    args = [
        sys.executable, "-m", "trainer_client", "--gateway", trainer_gateway,
        "--policy", str(tiny_policy), "--prompts", str(prompts_file), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "out_dir" in proc.stderr and "--resume" in proc.stderr


def test_gateway_down_stalls_then_stops_with_a_checkpoint(
    tiny_policy: Path, prompts_file: Path, tmp_path: Path
) -> None:
    """Nothing listens on the port: the run says so, retries, and stops with exit code 3."""
    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "trainer_client", "--gateway", url,
        "--policy", str(tiny_policy), "--prompts", str(prompts_file), "--out", str(out),
        "--steps", "1", "--max-new-tokens", "4", "--gateway-patience-s", "3",
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "retrying" in proc.stderr and url in proc.stderr
    assert "still failing" in proc.stderr
    # it checkpointed before stopping, so --resume can continue
    assert (out / "checkpoint" / "trainer_state.json").exists()


@pytest.mark.parametrize("bad", [["--beta", "0"], ["-k", "1"], ["--gateway", "ftp://x"]])
def test_bad_options_name_the_field(tiny_policy: Path, tmp_path: Path, bad: list[str]) -> None:
    args = [
        sys.executable, "-m", "trainer_client", "--gateway", "http://127.0.0.1:1",
        "--out", str(tmp_path / "o"), "--policy", str(tiny_policy), *bad,
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    field = {"--beta": "beta", "-k": "samples_per_prompt", "--gateway": "gateway"}[bad[0]]
    assert f"error: {field}:" in proc.stderr


def test_undelivered_feedback_is_kept_and_sent_on_resume(
    trainer_gateway: str, tmp_path: Path
) -> None:
    """Feedback the gateway did not take stays in pending_feedback.json until it does."""
    from trainer_client import GatewayClient
    from trainer_client.online_dpo import GatewayStalled, OnlineDPOConfig, OnlineDPOTrainer

    ns = "pending-fb"
    with GatewayClient(trainer_gateway) as gw:
        gw.create_namespace(ns)
        routed = gw.route(
            [{"prompt": "hi", "response_a": "a", "response_b": "bb"}] * 3, namespace=ns
        )
    items = [(r.route_id, -0.25) for r in routed.results]
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = OnlineDPOConfig(gateway=dead, out_dir=tmp_path, gateway_patience_s=1.5)
    down = OnlineDPOTrainer(cfg, say=lambda msg: None)
    with pytest.raises(GatewayStalled, match="still failing"):
        down._post_feedback(items)
    down.close()
    pending = json.loads((tmp_path / "pending_feedback.json").read_text())
    assert [tuple(x) for x in pending] == items

    said: list[str] = []
    up = OnlineDPOTrainer(cfg.model_copy(update={"gateway": trainer_gateway}), say=said.append)
    up._flush_pending()
    up.close()
    assert not (tmp_path / "pending_feedback.json").exists()
    assert up.totals.feedback_applied == 3 and any("pending" in m for m in said)
    assert sum(_observations(trainer_gateway, ns).values()) == 3


def test_lora_run_saves_an_adapter_and_resumes(
    trainer_gateway: str, tiny_policy: Path, prompts_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    _train(trainer_gateway, tiny_policy, prompts_file, out, "--steps", "1", "--lora")
    ckpt = out / "checkpoint"
    first = load_file(str(ckpt / "adapter_model.safetensors"))
    assert first and not (ckpt / "model.safetensors").exists()
    _train(trainer_gateway, tiny_policy, prompts_file, out, "--steps", "2", "--lora", "--resume")
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["feedback"]["applied"] == r["routed"] for r in log)
    second = load_file(str(ckpt / "adapter_model.safetensors"))
    # the adapter kept training after the resume (LoRA B starts at zero, so step 1 moved it)
    assert any(not (second[k] == first[k]).all() for k in first)


def test_unknown_feedback_is_counted_and_a_lost_namespace_stops_a_resume(
    trainer_gateway: str, tmp_path: Path
) -> None:
    """Route ids the gateway no longer knows are counted and said; a resumed run whose
    namespace is gone stops, naming it, instead of learning anew from a fresh prior."""
    from reward_router.errors import ConfigError
    from trainer_client.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    said: list[str] = []
    cfg = OnlineDPOConfig(gateway=trainer_gateway, out_dir=tmp_path, namespace="never-made")
    tr = OnlineDPOTrainer(cfg, say=said.append)
    try:
        out, _ = tr._post_feedback([("never-made:0a0a0a0a:ff", -0.5), ("x:y:z", -0.5)])
        assert out["unknown"] == 2 and tr.totals.feedback_unknown == 2
        assert any("did not know 2 of 2 route ids" in m for m in said)
        with pytest.raises(ConfigError, match=r"never-made.*gone from the gateway"):
            tr._ensure_namespace(resumed=True)
        tr._ensure_namespace(resumed=False)  # a new run creates it
        assert _observations(trainer_gateway, "never-made") == {"length": 0, "verifier": 0}
    finally:
        tr.close()
