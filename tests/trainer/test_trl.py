"""The TRL integration with TRL itself (trl==1.16.0): TRL's Online DPO trainer on a tiny real
Llama, the gateway as its reward function, per-pair −DPO loss posted back."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

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
