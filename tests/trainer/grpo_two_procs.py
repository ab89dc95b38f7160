"""TRL's GRPOTrainer on 2 processes with the gateway as its reward: run by ``python -m
torch.distributed.run --nproc_per_node 2`` (gloo on CPU) from tests/trainer/test_trl.py; pytest
does not collect it.

argv: gateway URL, namespace, tiny policy dir, output dir. Each process writes
``rank{R}.json``: the rows it scored per generation (prompt, text, global row, anchor row and
anchor text, route id) and its feedback counts. The reward function the trainer gets is a
pickle round trip of the one built here, so the unpickled copy is what routes and posts.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig

from trainer_client import GatewayClient
from trainer_client.trl_adapter import GatewayScalarReward, _text, make_grpo_trainer


class Recording(GatewayScalarReward):
    """Keeps what every call saw, for the test's cross-process checks."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, prompts: Any, completions: Any, **kwargs: Any) -> list[float]:
        scores = super().__call__(prompts, completions, **kwargs)
        anchor = {c.row: c.anchor for c in self.comparisons}
        self.calls.append(
            {
                "offset": self.offset,
                "rows": [
                    {
                        "row": self.offset + j,
                        "prompt": repr(p),
                        "route": self.last_routes[j],
                        "anchor": anchor.get(self.offset + j),
                        "score": s,
                    }
                    for j, (p, s) in enumerate(zip(prompts, scores, strict=True))
                ],
                "texts": [_text(c) for c in completions],
            }
        )
        return scores


def main(url: str, ns: str, policy: str, out: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(policy)
    tok = AutoTokenizer.from_pretrained(policy)
    tok.padding_side = "left"
    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} + 1?"}], "reference": str(i + 1)}
         for i in range(12)]
    )  # fmt: skip
    args = GRPOConfig(
        output_dir=str(Path(out) / "trainer"),
        per_device_train_batch_size=3,  # 2 processes x 3 rows = 3 groups of 2: one group spans both
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    reward = pickle.loads(pickle.dumps(Recording(GatewayClient(url), namespace=ns)))
    trainer = make_grpo_trainer(
        model=model, reward=reward, args=args, processing_class=tok, train_dataset=ds
    )
    posted: list[tuple[str, float]] = []
    post = trainer._post_feedback

    def recording_post() -> None:
        posted.extend(trainer.pending_feedback)
        post()

    trainer._post_feedback = recording_post
    trainer.train()
    rank = trainer.accelerator.process_index
    key = "gateway/feedback"
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "calls": reward.calls,
                "feedback_applied": trainer.feedback_applied,
                "feedback_posted": trainer.feedback_posted,
                "pending": len(trainer.pending_feedback),
                "posted": posted,
                "logged": [h[key] for h in trainer.state.log_history if key in h],
                "world": trainer.accelerator.num_processes,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
