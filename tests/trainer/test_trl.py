"""The TRL integration with TRL itself (trl==1.16.0): TRL's Online DPO trainer on a tiny real
Llama, the gateway as its reward function, per-pair −DPO loss posted back."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.procs import free_port
from trainer_client import GatewayClient
from trainer_client.trl_adapter import GatewayPairReward, GatewayScalarReward

trl = pytest.importorskip("trl")

pytestmark = pytest.mark.filterwarnings(
    # TRL warns on importing its experimental package and about options we do not set
    "ignore::UserWarning",
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
)


def _observations(url: str, ns: str) -> int:
    r = httpx.get(f"{url}/v1/posteriors", params={"namespace": ns}, timeout=30)
    assert r.status_code == 200, r.text
    return sum(rm["observations"] for rm in r.json()["rms"])


def test_pair_reward_sends_rows_i_and_i_plus_b_as_one_pair(trainer_gateway: str) -> None:
    with GatewayClient(trainer_gateway) as gw:
        reward = GatewayPairReward(gw, namespace="trl-pairs")
        prompts = ["what is 2+2?", "say hi", "what is 2+2?", "say hi"]
        completions = ["4", "hi", "it is 5, quite surely", "hi"]  # rows (0,2) and (1,3)
        scores = reward(prompts=prompts, completions=completions, reference=["4", None] * 2)
        # one pair routed (the equal "hi"/"hi" couple is not), judged by one RM for both rows
        assert reward.last_routes[0] is not None and reward.last_routes[1] is None
        assert scores[1] == scores[3] == 0.5
        assert sorted([scores[0], scores[2]]) == [0.0, 1.0]
        # the verifier prefers the right answer, the length RM the longer one
        expected = [1.0, 0.0] if reward.last_rms[0] == "verifier" else [0.0, 1.0]
        assert [scores[0], scores[2]] == expected


def test_scalar_reward_scores_every_completion_in_unit_interval(trainer_gateway: str) -> None:
    with GatewayClient(trainer_gateway) as gw:
        reward = GatewayScalarReward(gw, namespace="trl-scalar")
        prompts = ["p1"] * 3 + ["p2"] * 2
        completions = ["short", "a much longer answer", "x", "aa", "aaaa aaaa"]
        scores = reward(prompts=prompts, completions=completions)
    assert len(scores) == 5 and all(0.0 <= s <= 1.0 for s in scores)
    assert scores[0] == scores[3] == 0.5  # the first of each prompt is the anchor
    assert reward.last_routes[0] is None and all(reward.last_routes[i] for i in (1, 2, 4))


def test_trl_online_dpo_trains_and_posts_per_pair_feedback(
    trainer_gateway: str, tiny_policy: Path, tmp_path: Path
) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig

    from trainer_client.trl_adapter import make_online_dpo_trainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_policy))
    tok = AutoTokenizer.from_pretrained(str(tiny_policy))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} + 1?"}], "reference": str(i + 1)}
         for i in range(8)]
    )  # fmt: skip
    args = OnlineDPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=3,
        max_new_tokens=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        gradient_checkpointing=False,
        seed=0,
    )
    ns = "trl-dpo"
    with GatewayClient(trainer_gateway) as gw:
        reward = GatewayPairReward(gw, namespace=ns)
        trainer = make_online_dpo_trainer(
            model=model, reward=reward, args=args, processing_class=tok, train_dataset=ds
        )
        trainer.train()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    # every routed pair's −DPO loss reached the gateway (3 steps x up to 2 pairs)
    assert trainer.pending_feedback == []
    assert 0 < trainer.feedback_applied <= 6
    assert _observations(trainer_gateway, ns) == trainer.feedback_applied


# ---- GRPO ------------------------------------------------------------------------------------


def test_anchor_rows_one_per_prompt_in_global_order() -> None:
    from trainer_client.trl_adapter import anchor_rows

    # TRL's global order for 2 processes x 3 rows, num_generations=2: p1 spans both processes
    keys = ["p0", "p0", "p1", "p1", "p2", "p2"]
    rank0, rank1 = keys[:3], keys[3:]
    assert anchor_rows(keys) == [0, 0, 2, 2, 4, 4]
    # what each process would pick from its own slice alone: p1's anchor would differ
    assert anchor_rows(rank0)[2] + 0 != anchor_rows(rank1)[0] + 3


def test_step_feedback_is_dpo_loss_against_the_pre_step_policy() -> None:
    from trainer_client.trl_adapter import step_feedback

    # the preferred side gained log-probability relative to the other: loss below log 2
    assert step_feedback(0.5, -0.5, "a", 1.0) == pytest.approx(-math.log1p(math.exp(-1.0)))
    assert step_feedback(0.5, -0.5, "b", 1.0) == pytest.approx(-math.log1p(math.exp(1.0)))
    assert step_feedback(3.0, 1.0, "tie", 1.0) == pytest.approx(-math.log(2.0))
    assert step_feedback(400.0, -400.0, "b", 1.0) == pytest.approx(-800.0)  # no overflow


def test_scalar_reward_and_client_survive_pickling(trainer_gateway: str) -> None:
    reward = GatewayScalarReward(GatewayClient(trainer_gateway, api_key="k"), namespace="trl-pk")
    reward(prompts=["p"] * 2, completions=["a", "a longer one"])  # a used client pickles too
    copy = pickle.loads(pickle.dumps(reward))
    # what AsyncGRPOTrainer does: the function pickled into a spawned process, called there
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        remote = pool.apply(reward, (), {"prompts": ["q"] * 2, "completions": ["x", "xyz xyz"]})
    assert remote[0] == 0.5 and 0.0 <= remote[1] <= 1.0
    try:
        assert copy.client is not reward.client and copy.client.base_url == trainer_gateway
        assert copy.client._http.headers["authorization"] == "Bearer k"
        scores = copy(prompts=["p"] * 2, completions=["short", "a much longer answer"])
        assert scores[0] == 0.5 and copy.last_routes[1] is not None
    finally:
        reward.client.close()
        copy.client.close()
    mocked = GatewayClient(trainer_gateway, transport=httpx.MockTransport(httpx.Response))
    with pytest.raises(TypeError, match="transport"):
        pickle.dumps(mocked)
    mocked.close()


@pytest.mark.slow
def test_trl_grpo_on_two_processes_one_anchor_per_group_and_feedback(
    trainer_gateway: str, tiny_policy: Path, tmp_path: Path
) -> None:
    """torchrun --nproc_per_node 2 (gloo, CPU): TRL's GRPOTrainer, 2 steps of 3 groups of 2
    (6 rows, 3 per process, so one group spans both processes)."""
    ns = "trl-grpo-2p"
    script = Path(__file__).with_name("grpo_two_procs.py")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    # torchrun sets RANK/WORLD_SIZE; with use_cpu=True TRL's accelerate state uses gloo (accelerate
    # launch --cpu alone starts ONE process on a single machine)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), trainer_gateway, ns, str(tiny_policy), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert len(ranks[0]["calls"]) == len(ranks[1]["calls"]) == 2  # one generation per step
    routes = 0
    spanning = 0
    for c0, c1 in zip(ranks[0]["calls"], ranks[1]["calls"], strict=True):
        rows = c0["rows"] + c1["rows"]
        texts = c0["texts"] + c1["texts"]
        assert [r["row"] for r in rows] == list(range(6))
        groups: dict[str, list[int]] = {}
        for r in rows:
            groups.setdefault(r["prompt"], []).append(r["row"])
        assert sorted(len(g) for g in groups.values()) == [2, 2, 2]
        for g in groups.values():
            anchor = g[0]  # the first row of the group in TRL's global order, on every process
            assert rows[anchor]["route"] is None and rows[anchor]["score"] == 0.5
            for j in g[1:]:
                if texts[j] == texts[anchor]:
                    assert rows[j]["route"] is None  # equal texts are not routed
                    continue
                assert rows[j]["route"] is not None and rows[j]["anchor"] == anchor
                routes += 1
                spanning += (j < 3) != (anchor < 3)
        ids = [r["route"] for r in rows if r["route"]]
        assert len(ids) == len(set(ids))
    assert routes > 0 and spanning > 0  # a group split over both processes still has one anchor
    # every routed comparison got its feedback, each process posting its own routes
    assert sum(r["feedback_posted"] for r in ranks) == routes
    assert [r["pending"] for r in ranks] == [0, 0]
    rewards = [x for r in ranks for _, x in r["posted"]]
    assert len(rewards) == routes and all(math.isfinite(x) and x < 0 for x in rewards)
    # the policy stepped (lr 1e-2), so some pair's log-probabilities moved: not all at -log 2
    assert any(abs(x + math.log(2.0)) > 1e-6 for x in rewards)
    # TRL's log of step 2 holds the mean over both processes of step 1's posted rewards (its
    # batch is measured at step 2's generation; step 2's own at the end of train, unlogged)
    n_first = [sum(1 for w in r["calls"][0]["rows"] if w["route"]) for r in ranks]
    first = [x for r, n in zip(ranks, n_first, strict=True) for _, x in r["posted"][:n]]
    assert ranks[0]["logged"] == [pytest.approx(sum(first) / len(first), rel=1e-5)]
    applied = sum(r["feedback_applied"] for r in ranks)
    assert applied == routes
    assert _observations(trainer_gateway, ns) == applied


class _FailFirstFeedback(httpx.HTTPTransport):
    """A real connection to the gateway, whose first ``/v1/feedback`` never leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/feedback" and not self.failed:
            self.failed += 1
            raise httpx.ConnectError("injected: feedback not sent", request=request)
        return super().handle_request(request)


def test_trl_grpo_keeps_undelivered_feedback_and_sends_it_next_time(
    trainer_gateway: str, tiny_policy: Path, tmp_path: Path
) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from trainer_client.client import RetryPolicy
    from trainer_client.trl_adapter import make_grpo_trainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_policy))
    tok = AutoTokenizer.from_pretrained(str(tiny_policy), padding_side="left")
    ds = Dataset.from_list([{"prompt": f"what is {i} + 1?"} for i in range(8)])
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    ns = "trl-grpo-retry"
    transport = _FailFirstFeedback()
    with GatewayClient(trainer_gateway, transport=transport, retry=RetryPolicy(retries=0)) as gw:
        reward = GatewayScalarReward(gw, namespace=ns)
        trainer = make_grpo_trainer(
            model=model, reward=reward, args=args, processing_class=tok, train_dataset=ds
        )
        trainer.train()
    rms = httpx.get(f"{trainer_gateway}/v1/posteriors", params={"namespace": ns}).json()["rms"]
    routed = sum(rm["routes"] for rm in rms)
    # step 1's feedback failed at step 2's generation, was kept, and went with step 2's at the end
    assert transport.failed == 1 and trainer.pending_feedback == []
    assert 0 < trainer.feedback_applied == trainer.feedback_posted == routed <= 4
    assert sum(rm["observations"] for rm in rms) == routed  # every routed comparison, once
