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
  completion): each completion compared with ONE anchor per prompt group, the group's first
  completion in TRL's global order (the same on every process: the function gathers the
  processes' rows under ``torch.distributed``), by one RM (Bradley-Terry win probability in
  [0, 1]; the anchor scores 0.5). Picklable, for ``AsyncGRPOTrainer``'s spawned scorer.
* :func:`make_grpo_trainer` (``GatewayGRPOTrainer``): TRL's GRPO posting, for each routed
  comparison, the pair's −DPO loss with the policy before the step as the reference, once the
  policy has stepped on it (:func:`step_feedback`).

TRL is imported only inside the trainer factories, so importing this module costs nothing when
TRL is not installed.

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
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer_client.client import GatewayClient
from trainer_client.errors import GatewayError, NamespaceConflict

log = logging.getLogger("reward_router.trainer")

__all__ = [
    "Comparison",
    "GatewayPairReward",
    "GatewayScalarReward",
    "anchor_rows",
    "make_grpo_trainer",
    "make_online_dpo_trainer",
    "step_feedback",
]


def _deliver(client: GatewayClient, pending: list[tuple[str, float]]) -> int | None:
    """Post ``pending`` feedback: how many were applied, or None when it was not delivered (the
    caller keeps it and sends it again with the next step; the gateway applies each id once)."""
    if not pending:
        return None
    try:
        res = client.feedback(pending)
    except GatewayError as exc:
        log.warning(
            "feedback for %d routes not delivered (%s); sending again next step", len(pending), exc
        )
        return None
    return res.applied


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


@dataclass(frozen=True)
class Comparison:
    """One routed pair of a GRPO group: the completion at global row ``row`` (``response_a``)
    against its group's anchor at global row ``anchor`` (``response_b``), as the RM judged it."""

    route_id: str
    row: int
    anchor: int
    preferred: str  # "a" (the row), "b" (the anchor) or "tie"
    rm: str


def anchor_rows(keys: Sequence[str]) -> list[int]:
    """For each row of a global batch, the row of its group's anchor: the first row with the
    same prompt. Every rank computes this on the same gathered list, so all agree.

    >>> anchor_rows(["p0", "p0", "p1", "p1", "p2", "p2"])
    [0, 0, 2, 2, 4, 4]
    """
    first: dict[str, int] = {}
    return [first.setdefault(k, j) for j, k in enumerate(keys)]


def step_feedback(delta_row: float, delta_anchor: float, preferred: str, beta: float) -> float:
    """The reward posted for one GRPO comparison: the pair's −DPO loss with the policy before
    the step as the reference, ``log sigmoid(beta * (d_w - d_l))`` where ``d`` is the gain in
    summed completion log-probability over the step of the preferred (``w``) and the other
    (``l``) completion. A tie posts ``-log 2`` (nothing to agree with).

    >>> round(step_feedback(0.3, 0.1, "a", 1.0), 4), round(step_feedback(0.3, 0.1, "b", 1.0), 4)
    (-0.5981, -0.7981)
    """
    if preferred == "tie":
        return -math.log(2.0)
    w, lo = (delta_row, delta_anchor) if preferred == "a" else (delta_anchor, delta_row)
    x = beta * (w - lo)
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when a process group is up, else (0, 1).
    torch is only looked at when the trainer already imported it."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0, 1
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def _all_gather(obj: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


class GatewayScalarReward(_GatewayReward):
    """A GRPO-style reward function: one score in [0, 1] per completion, via the gateway.

    Each prompt's group has ONE anchor, the group's first completion in TRL's global order;
    every other completion is routed as one pair against it and scores
    ``sigmoid(score_row - score_anchor)`` from that pair's RM (the anchor, and a completion
    equal to it, 0.5). TRL's ``GRPOTrainer`` gives each process a contiguous slice of the
    generation batch (the slices concatenated in process order, as TRL gathers the rewards), so
    a group can span processes; under ``torch.distributed`` this function gathers the prompts and
    completions of all processes (every process calls the reward functions at the same point)
    and each process routes only its own rows against the same anchor. Without a process group
    (one process, or ``AsyncGRPOTrainer``'s scoring child, which calls once per whole group)
    the call's own rows are the batch.

    After each call :attr:`comparisons` holds the routed pairs (global rows) and
    :attr:`last_routes` the route id per local row (``None`` for anchors). Picklable:
    ``AsyncGRPOTrainer`` pickles reward functions into a spawned process; the copy opens its own
    connections. Feedback: :func:`make_grpo_trainer`.
    """

    __name__ = "gateway_scalar_reward"

    def __init__(
        self,
        client: GatewayClient,
        *,
        namespace: str = "default",
        reference_column: str = "reference",
        across_processes: bool = True,
    ) -> None:
        super().__init__(client, namespace=namespace, reference_column=reference_column)
        self.across_processes = across_processes
        self.comparisons: list[Comparison] = []
        self.offset = 0  # this process's first row in the global batch of the last call

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        keys = [repr(p) for p in prompts]
        texts = [_text(c) for c in completions]
        rank, world = _world() if self.across_processes else (0, 1)
        if world > 1:
            parts = _all_gather((keys, texts), world)
            offset = sum(len(k) for k, _ in parts[:rank])
            all_keys = [k for ks, _ in parts for k in ks]
            all_texts = [t for _, ts in parts for t in ts]
        else:
            offset, all_keys, all_texts = 0, keys, texts
        anchors = anchor_rows(all_keys)
        payload, rows = [], []
        for j, text in enumerate(texts):
            a = anchors[offset + j]
            if a == offset + j or all_texts[a] == text:
                continue  # the anchor itself, or equal to it: no RM can prefer one
            pair: dict[str, Any] = {
                "prompt": _prompt(prompts[j]),
                "response_a": text,
                "response_b": all_texts[a],
            }
            ref = _column(kwargs, self.reference_column, j)
            if ref is not None:
                pair["reference"] = ref
            payload.append(pair)
            rows.append(j)
        scores = [0.5] * len(completions)
        last_routes: list[str | None] = [None] * len(completions)
        last_rms: list[str | None] = [None] * len(completions)
        comparisons = []
        if payload:
            res = self._route(payload)
            for j, r in zip(rows, res.results, strict=True):
                scores[j] = _sigmoid(r.score_a - r.score_b)
                last_routes[j], last_rms[j] = r.route_id, r.rm
                comparisons.append(
                    Comparison(r.route_id, offset + j, anchors[offset + j], r.preferred, r.rm)
                )
        self.last_routes, self.last_rms = last_routes, last_rms
        self.comparisons, self.offset = comparisons, offset
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
            applied = _deliver(self.gateway_reward.client, self.pending_feedback)
            if applied is not None:
                self.feedback_applied += applied
                self.pending_feedback = []

    return GatewayOnlineDPOTrainer


def make_grpo_trainer(
    *, reward: GatewayScalarReward, feedback_beta: float = 1.0, **kwargs: Any
) -> Any:
    """TRL's GRPO trainer with ``reward`` among its reward functions, posting feedback.

    ``kwargs`` are TRL's (``model``, ``args``, ``processing_class``, ``train_dataset``, and
    optionally more ``reward_funcs``: ``reward`` is added first). Needs ``trl``.
    """
    if not math.isfinite(feedback_beta) or feedback_beta <= 0:
        raise ValueError(f"feedback_beta: must be a positive number, got {feedback_beta}")
    extra = kwargs.pop("reward_funcs", None) or []
    funcs = [reward, *(extra if isinstance(extra, list) else [extra])]
    cls = gateway_grpo_trainer_class()
    return cls(reward_funcs=funcs, gateway_reward=reward, feedback_beta=feedback_beta, **kwargs)


def gateway_grpo_trainer_class() -> type:
    """Build the subclass lazily (TRL imports torch, transformers, datasets)."""
    import torch
    from trl import GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing

    class GatewayGRPOTrainer(GRPOTrainer):
        """TRL's GRPO, posting one reward per routed comparison after the policy stepped on it.

        The signal (see :func:`step_feedback`): for each comparison (a completion against its
        group's anchor, labelled by one RM), the −DPO loss of that pair with the policy BEFORE
        the steps that used the batch as the reference, measured once the policy has taken them
        (at the next generation, or at the end of ``train``). It says whether GRPO moved the
        policy towards the completion this RM preferred, as the Online DPO path's −DPO loss does.
        """

        def __init__(
            self, *args: Any, gateway_reward: GatewayScalarReward, feedback_beta: float, **kw: Any
        ) -> None:
            super().__init__(*args, **kw)
            self.gateway_reward = gateway_reward
            self.feedback_beta = feedback_beta
            self._held: tuple[Any, ...] | None = None
            self.pending_feedback: list[tuple[str, float]] = []
            self.feedback_applied = 0
            self.feedback_posted = 0

        def _sequence_logps(self, ids: Any, mask: Any, keep: int, cmask: Any) -> Any:
            model: Any = self.model
            kw: Any = self.args.gradient_checkpointing_kwargs
            off = disable_gradient_checkpointing(model, kw)
            with torch.no_grad(), off:  # as TRL does for its own no-grad forwards
                logps, _, _ = self._get_per_token_logps_and_entropies(
                    model, ids, mask, keep, batch_size=self.args.per_device_train_batch_size
                )
            return (logps * cmask).sum(1)

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            training = bool(getattr(self.model, "training", False))
            if training:
                self._score_held()  # the policy has taken every step on the last batch
            out = super()._generate_and_score_completions(inputs)
            if training:
                ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
                mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
                keep, cmask = out["completion_ids"].size(1), out["completion_mask"]
                before = self._sequence_logps(ids, mask, keep, cmask)
                comps = list(self.gateway_reward.comparisons)
                self._held = (ids, mask, keep, cmask, before, comps)
            return out

        def train(self, *args: Any, **kw: Any) -> Any:
            out = super().train(*args, **kw)
            self._score_held()
            return out

        def _score_held(self) -> None:
            """Measure the held batch under the stepped policy; post this process's routes.
            Runs on every process at the same point (``gather`` is a collective)."""
            if self._held is None:
                return
            ids, mask, keep, cmask, before, comps = self._held
            self._held = None
            delta = self.accelerator.gather(self._sequence_logps(ids, mask, keep, cmask) - before)
            d = delta.float().cpu().tolist()
            rewards = [step_feedback(d[c.row], d[c.anchor], c.preferred, self.feedback_beta)
                       for c in comps]  # fmt: skip
            self.pending_feedback += [(c.route_id, r) for c, r in zip(comps, rewards, strict=True)]
            # TRL's log: the mean posted reward over all processes' comparisons of the batch
            stats = torch.tensor([sum(rewards), len(rewards)], device=delta.device)
            total, count = self.accelerator.gather(stats).view(-1, 2).sum(0).tolist()
            if count:
                self._metrics["train"]["gateway/feedback"].append(total / count)
            self._post_feedback()

        def _post_feedback(self) -> None:
            applied = _deliver(self.gateway_reward.client, self.pending_feedback)
            if applied is not None:
                self.feedback_posted += len(self.pending_feedback)
                self.feedback_applied += applied
                self.pending_feedback = []

    return GatewayGRPOTrainer
