"""The DPO pieces of the trainer, as plain torch functions (imported only when training).

DPO (Rafailov et al.): for a pair labelled ``y_w`` over ``y_l``, with the policy's and the
frozen reference's summed log-probabilities of each response,

    margin = beta * ((logp_w - ref_w) - (logp_l - ref_l))       (the "reward margin")
    loss   = -log sigmoid(margin)

The trainer posts ``-loss`` per pair back to the gateway as the RM's reward (the paper's
signal). A tie (the RM has no preference) trains nothing and is scored as the mean loss of its
two orientations, a 50/50 label.

>>> import torch
>>> loss, margin = dpo_losses(torch.tensor([-1.0]), torch.tensor([-2.0]),
...                           torch.tensor([-1.5]), torch.tensor([-1.5]), beta=1.0)
>>> round(float(margin), 3), round(float(loss), 3)
(1.0, 0.313)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def dpo_losses(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and reward margin (both shape (P,))."""
    margin = beta * ((policy_w - ref_w) - (policy_l - ref_l))
    return -F.logsigmoid(margin), margin


def tie_losses(margin_ab: torch.Tensor) -> torch.Tensor:
    """Mean DPO loss of the two orientations of a pair (``margin_ab`` is a over b)."""
    return -(F.logsigmoid(margin_ab) + F.logsigmoid(-margin_ab)) / 2


def sequence_logps(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
) -> torch.Tensor:
    """Summed log-probability of each response given its prompt, shape (S,).

    Sequences are right-padded into one batch; only response tokens count. The per-token
    log-probability is ``logit[y] - logsumexp(logits)`` so the full log-softmax over the
    vocabulary is never materialised a second time.
    """
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool, device=device)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        mask[i, len(p) : len(s)] = True
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    target = ids[:, 1:]
    tok_logp = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (tok_logp * mask[:, 1:]).sum(-1)
