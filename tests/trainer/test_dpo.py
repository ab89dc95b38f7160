"""The DPO pieces against direct computations on a tiny real Llama, and the prompt loaders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from reward_router.errors import DataFormatError
from trainer_client.dpo import dpo_losses, sequence_logps, tie_losses
from trainer_client.online_dpo import pair_indices, prompt_batch
from trainer_client.prompts import load_prompts, shipped_mix


def test_sequence_logps_match_one_sequence_at_a_time(tiny_policy: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_policy)).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    responses = [[20, 21], [22, 23, 24, 25], [26]]
    with torch.no_grad():
        batched = sequence_logps(model, prompts, responses, pad_id=0)
        direct = []
        for p, r in zip(prompts, responses, strict=True):
            lp = model(input_ids=torch.tensor([p + r])).logits[0].log_softmax(-1)
            direct.append(sum(float(lp[len(p) - 1 + t, r[t]]) for t in range(len(r))))
    np.testing.assert_allclose(batched.numpy(), direct, rtol=1e-4, atol=1e-4)


def test_dpo_loss_and_margin() -> None:
    loss, margin = dpo_losses(
        torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]),
        torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0]), beta=0.5,
    )  # fmt: skip
    np.testing.assert_allclose(margin.numpy(), [0.5, -1.0])
    np.testing.assert_allclose(loss.numpy(), [math.log1p(math.exp(-0.5)), math.log1p(math.e)])
    # a tie scores both orientations equally: symmetric, and log 2 at margin 0
    m = torch.tensor([0.0, 1.3, -1.3])
    t = tie_losses(m)
    assert float(t[0]) == pytest.approx(math.log(2))
    assert float(t[1]) == pytest.approx(float(t[2]))


def test_prompt_batches_cover_every_prompt_once_per_epoch() -> None:
    seen = [i for s in range(5) for i in prompt_batch(10, 2, s, seed=3)]
    assert sorted(seen) == list(range(10))
    assert prompt_batch(10, 2, 4, seed=3) == prompt_batch(10, 2, 4, seed=3)
    rng = np.random.default_rng(0)
    assert len(pair_indices(4, None, rng)) == 6
    sub = pair_indices(4, 2, rng)
    assert len(sub) == 2 and all(i < j for i, j in sub)


def test_prompt_files(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text(
        json.dumps({"prompt": "hi"}) + "\n"
        + json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n"
    )  # fmt: skip
    items = load_prompts(p)
    assert [(i.domain, i.reference) for i in items] == [("chat", None), ("math", "2")]
    p.write_text(json.dumps({"prompt": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(DataFormatError, match=r"p.jsonl:1: field 'prompt'"):
        load_prompts(p)
    p.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataFormatError, match="prompt"):
        load_prompts(p)


def test_shipped_mix_has_chat_safety_and_math_with_references() -> None:
    items = shipped_mix(per_domain=5, seed=1)
    assert [i.domain for i in items[:3]] == ["chat", "safety", "math"]
    assert len(items) == 15
    assert all(i.reference for i in items if i.domain == "math")
    assert all(i.messages[-1]["role"] == "user" for i in items)
