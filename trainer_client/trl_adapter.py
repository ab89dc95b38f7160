"""TRL integration: the gateway as ``reward_funcs`` of TRL's trainers (tested with trl 1.16.0).

* :class:`GatewayPairReward` for TRL's Online DPO trainer
  (``trl.experimental.online_dpo.OnlineDPOTrainer``). TRL generates two completions per prompt
  and calls the reward function once with ``2B`` rows: row ``i`` and row ``i + B`` are the two
  completions of prompt ``i``, and it keeps the higher-scored one as chosen. This function sends
  each such couple to the gateway as ONE pair, so one RM judges both, and returns 1.0 for the
  preferred side and 0.0 for the other (0.5 each for a tie; TRL then keeps row ``i``).
* :class:`GatewayOnlineDPOTrainer`: TRL averages the per-pair DPO loss before ``backward``, so
  the per-pair values the gateway learns from are not returned. This small subclass keeps the
  policy and reference log-probabilities TRL computes in ``_forward`` and the rewards TRL
  compared, recomputes each pair's DPO loss (the same formula, ``loss_type="sigmoid"``) and
  posts ``-loss`` per routed pair to ``/v1/feedback`` after every step. Feedback that fails is
  kept and sent again with the next step (the gateway applies each route id once).
* :class:`GatewayScalarReward` for GRPO-style trainers (``reward_funcs`` returning one float per
  completion): a score per completion from :class:`GatewayPairReward`-style routing, each
  completion compared with the first completion of its prompt by one RM (Bradley-Terry win
  probability in [0, 1]; the first completion scores 0.5).

TRL is imported only inside :class:`GatewayOnlineDPOTrainer`'s factory, so importing this
module costs nothing when TRL is not installed.

>>> from trainer_client import GatewayClient
>>> reward = GatewayPairReward(GatewayClient("http://127.0.0.1:8080"), namespace="trl-run")
>>> trainer = make_online_dpo_trainer(model=model, reward=reward, args=args,
...     processing_class=tok, train_dataset=ds)                     # doctest: +SKIP
>>> trainer.train()                                                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Any

from trainer_client.client import GatewayClient
from trainer_client.errors import GatewayError, NamespaceConflict

log = logging.getLogger("reward_router.trainer")

__all__ = ["GatewayPairReward", "GatewayScalarReward", "make_online_dpo_trainer"]


def _text(x: Any) -> str:
    """A TRL completion (a string, or conversational ``[{"role", "content"}]``) as text."""
    if isinstance(x, str):
        return x
    return "".join(str(m.get("content", "")) for m in x if isinstance(m, dict))


def _prompt(x: Any) -> str | list[dict[str, str]]:
    if isinstance(x, str):
        return x
    return [{"role": str(m["role"]), "content": _text([m])} for m in x]


def _column(kwargs: dict[str, Any], key: str, i: int) -> str | None:
    col = kwargs.get(key)
    if isinstance(col, list | tuple) and i < len(col) and col[i] is not None:
        return str(col[i])
    return None


class _GatewayReward:
    """What both reward functions share: the client, the namespace, the reference column, and
    the route ids of the last call (``None`` where nothing was routed)."""

    def __init__(
        self,
        client: GatewayClient,
        *,
        namespace: str = "default",
        reference_column: str = "reference",
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.reference_column = reference_column
        self.last_routes: list[str | None] = []
        self.last_rms: list[str | None] = []
        self._has_namespace = False

    def _route(self, payload: list[dict[str, Any]]) -> Any:
        """Route ``payload``; the first call creates the namespace (the gateway's policy
        defaults; one that exists is joined as it is). A route never creates one, so a
        namespace the gateway lost later is an error (404), not a fresh prior."""
        if not self._has_namespace:
            with contextlib.suppress(NamespaceConflict):  # exists with its own policy: use it
                self.client.create_namespace(self.namespace)
            self._has_namespace = True
        return self.client.route(payload, namespace=self.namespace)


class GatewayPairReward(_GatewayReward):
    """``reward_funcs`` entry for TRL's Online DPO: rows ``i`` and ``i + B`` are one pair.

    A dataset column ``reference`` (or ``reference_column``) is sent with each pair, so the
    verifier RM can check math answers. After each call, :attr:`last_routes` holds the route
    id of each pair (``None`` where both completions were identical and nothing was routed).

    >>> r = GatewayPairReward(GatewayClient("http://127.0.0.1:8080"))   # doctest: +SKIP
    >>> r(prompts=["2+2?", "2+2?"], completions=["4", "5"], reference=["4", "4"])
    ...                                                                  # doctest: +SKIP
    [1.0, 0.0]
    """

    __name__ = "gateway_pair_reward"  # TRL names its logged columns after the function

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        n = len(completions)
        if n % 2:
            raise ValueError(f"completions: TRL's Online DPO sends 2B rows, got {n}")
        b = n // 2
        scores = [0.5] * n
        payload, rows = [], []
        for i in range(b):
            a, c = _text(completions[i]), _text(completions[i + b])
            if a == c:
                continue  # no RM can prefer one of two equal texts; nothing to learn from it
            pair: dict[str, Any] = {"prompt": _prompt(prompts[i]), "response_a": a, "response_b": c}
            ref = _column(kwargs, self.reference_column, i)
            if ref is not None:
                pair["reference"] = ref
            payload.append(pair)
            rows.append(i)
        self.last_routes = [None] * b
        self.last_rms = [None] * b
        if payload:
            res = self._route(payload)
            for i, r in zip(rows, res.results, strict=True):
                self.last_routes[i] = r.route_id
                self.last_rms[i] = r.rm
                if r.preferred != "tie":
                    scores[i], scores[i + b] = (1.0, 0.0) if r.preferred == "a" else (0.0, 1.0)
        return scores


class GatewayScalarReward(_GatewayReward):
    """A GRPO-style reward function: one score in [0, 1] per completion, via the gateway.

    The completions of one prompt come in the same call (GRPO generates a group per prompt);
    each completion after the first is compared with the first by ONE routed pair, and scores
    ``sigmoid(score_j - score_first)`` from that pair's RM (the first completion: 0.5). Route ids
    are in :attr:`last_routes` (one per compared completion) for posting feedback.
    """

    __name__ = "gateway_scalar_reward"

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        first: dict[str, int] = {}
        payload, rows = [], []
        for j, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            key = repr(p)
            if key not in first:
                first[key] = j
                continue
            pair: dict[str, Any] = {
                "prompt": _prompt(p),
                "response_a": _text(c),
                "response_b": _text(completions[first[key]]),
            }
            ref = _column(kwargs, self.reference_column, j)
            if ref is not None:
                pair["reference"] = ref
            payload.append(pair)
            rows.append(j)
        scores = [0.5] * len(completions)
        self.last_routes = [None] * len(completions)
        if payload:
            res = self._route(payload)
            for j, r in zip(rows, res.results, strict=True):
                scores[j] = 1.0 / (1.0 + math.exp(-(r.score_a - r.score_b)))
                self.last_routes[j] = r.route_id
        return scores


def make_online_dpo_trainer(*, reward: GatewayPairReward, **kwargs: Any) -> Any:
    """TRL's Online DPO trainer with ``reward`` as its reward function and per-pair feedback.

    ``kwargs`` are TRL's (``model``, ``args``, ``processing_class``, ``train_dataset``, ...).
    Needs ``trl`` (``pip install 'reward-router[train]'``) and ``loss_type="sigmoid"``.
    """
    cls = gateway_online_dpo_trainer_class()
    return cls(reward_funcs=[reward], gateway_reward=reward, **kwargs)


def gateway_online_dpo_trainer_class() -> type:
    """Build the subclass lazily (TRL imports torch, transformers, datasets)."""
    import torch
    from trl.experimental.online_dpo import OnlineDPOTrainer

    from trainer_client.dpo import dpo_losses

    class GatewayOnlineDPOTrainer(OnlineDPOTrainer):
        """TRL's Online DPO, posting each routed pair's −DPO loss back to the gateway."""

        def __init__(self, *args: Any, gateway_reward: GatewayPairReward, **kw: Any) -> None:
            super().__init__(*args, **kw)
            if getattr(self.args, "loss_type", "sigmoid") != "sigmoid":
                raise ValueError("loss_type: per-pair feedback needs the DPO loss ('sigmoid')")
            self.gateway_reward = gateway_reward
            self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []
            self._rewards: torch.Tensor | None = None
            self.pending_feedback: list[tuple[str, float]] = []
            self.feedback_applied = 0

        def _forward(self, model: Any, prompt_ids: Any, prompt_mask: Any, completion_ids: Any,
                     completion_mask: Any, vision_inputs: Any = None) -> Any:  # fmt: skip
            out = super()._forward(
                model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs
            )
            self._seen.append((out.detach(), completion_mask.detach()))
            return out

        def _calculate_rewards_from_functions(self, *args: Any, **kw: Any) -> Any:
            # TRL subtracts missing_eos_penalty from this very tensor in place afterwards, so
            # keeping it keeps the comparison TRL made.
            self._rewards = super()._calculate_rewards_from_functions(*args, **kw)
            return self._rewards

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            self._seen, self._rewards = [], None
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._post_pair_losses()
            return loss

        def _post_pair_losses(self) -> None:
            if self._rewards is None or len(self._seen) < 2:
                return
            (pol, mask), (ref, _) = self._seen[0], self._seen[1]
            m = mask.bool()
            pol_sum, ref_sum = (pol * m).sum(1), (ref * m).sum(1)
            b = pol_sum.shape[0] // 2
            first, second = self._rewards.split(b)
            first_wins = first >= second  # TRL's own rule
            rows = torch.arange(b, device=pol_sum.device)
            w = torch.where(first_wins, rows, rows + b)
            lo = torch.where(first_wins, rows + b, rows)
            losses, _ = dpo_losses(
                pol_sum[w], pol_sum[lo], ref_sum[w], ref_sum[lo], beta=float(self.beta)
            )
            for i, rid in enumerate(self.gateway_reward.last_routes[:b]):
                if rid is not None:
                    self.pending_feedback.append((rid, -float(losses[i])))
            if not self.pending_feedback:
                return
            try:
                res = self.gateway_reward.client.feedback(self.pending_feedback)
            except GatewayError as exc:
                log.warning(
                    "feedback for %d routes not delivered (%s); sending again next step",
                    len(self.pending_feedback),
                    exc,
                )
                return
            self.feedback_applied += res.applied
            self.pending_feedback = []

    return GatewayOnlineDPOTrainer
