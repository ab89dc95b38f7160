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

    Sequences are left-padded into one batch so that every response ends at the right edge:
    the vocabulary projection is then computed for the last ``R + 1`` positions only (``R`` =
    longest response), not for the prompts, which on a 49k-token vocabulary is most of the
    cost. Position ids follow the attention mask, so padding does not shift positions.
    The per-token log-probability is ``logit[y] - logsumexp(logits)`` (no second full
    log-softmax in memory).
    """
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    resp_max = max(len(r) for r in responses)
    device = next(model.parameters()).device
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), resp_max), dtype=torch.bool, device=device)
    for i, (r, s) in enumerate(zip(responses, seqs, strict=True)):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        attn[i, width - len(s) :] = 1
        mask[i, resp_max - len(r) :] = True
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=resp_max + 1
    )
    logits = out.logits[:, -(resp_max + 1) : -1].float()
    target = ids[:, width - resp_max :]
    tok_logp = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (tok_logp * mask).sum(-1)
