"""The Online DPO trainer process: generate, route, label, update the policy, post −DPO loss.

Per step (the loop of "Reward Model Routing in Alignment"):

1. take ``prompts_per_step`` prompts (deterministic in ``seed`` and the step number, so a
   resumed run sees the same batches);
2. sample ``samples_per_prompt`` responses per prompt from the current policy;
3. form pairs from them (all pairs, or ``pairs_per_prompt`` of them at random; identical
   responses are skipped: no RM can prefer one);
4. one ``/v1/route`` call for the batch: each pair is labelled by one RM; the preferred side
   is ``y_w``;
5. DPO loss per pair against the frozen initial policy (``beta``), one AdamW step on the mean
   (LoRA through peft optional);
6. the per-pair −DPO loss posted to ``/v1/feedback`` for every routed pair.

The step's feedback is written to ``pending_feedback.json`` before it is posted and removed
once the gateway has it, so a crash or a gateway outage never loses it: ``--resume`` sends it
first (the gateway applies each route id once, so sending twice is harmless). A gateway that is
down or slow stalls the run with a message naming the URL and the wait so far, and retries with
backoff for up to ``gateway_patience_s``; past that the run checkpoints and stops with a
:class:`GatewayStalled` error (exit code 3), never silently.

Outputs in ``out_dir``: ``log.jsonl`` (one object per step), ``checkpoint/`` (the policy as a
Hugging Face folder in safetensors, or the LoRA adapter; ``optimizer.safetensors``;
``trainer_state.json``) and ``summary.json``.

    reward-router train-dpo --gateway http://127.0.0.1:8080 --policy smollm2 \\
        --prompts shipped --steps 20 --out runs/dpo1
    python -m trainer_client --gateway ... (the same command)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from reward_router.errors import ConfigError, RewardRouterError
from reward_router.files import atomic_write
from reward_router.protocol import NAMESPACE_PATTERN
from trainer_client.client import GatewayClient, RetryPolicy, Timeouts
from trainer_client.errors import GatewayError, NamespaceConflict, NamespaceNotFound
from trainer_client.prompts import PromptItem, resolve_prompts

T = TypeVar("T")
CHECKPOINT = "checkpoint"
PENDING = "pending_feedback.json"
STATE = "trainer_state.json"


class GatewayStalled(RewardRouterError):
    """The gateway stayed unreachable past ``gateway_patience_s``; the run stopped cleanly.

    ``record``: the log record of a step that was trained but whose feedback is still pending.
    """

    record: dict[str, Any] | None = None


class OnlineDPOConfig(BaseModel):
    """Every knob of a run; a bad value raises ``ConfigError`` naming the field.

    >>> OnlineDPOConfig(gateway="http://127.0.0.1:8080", out_dir="runs/x").samples_per_prompt
    2
    """

    model_config = ConfigDict(extra="forbid")

    gateway: str = Field(pattern=r"^https?://")
    api_key: SecretStr | None = None
    namespace: str | None = Field(default=None, pattern=NAMESPACE_PATTERN)
    policy: str = "smollm2"
    prompts: str = "shipped"
    out_dir: Path
    steps: int = Field(default=20, ge=1)
    prompts_per_step: int = Field(default=4, ge=1)
    samples_per_prompt: int = Field(default=2, ge=2, le=16)
    pairs_per_prompt: int | None = Field(default=None, ge=1)
    beta: float = Field(default=0.1, gt=0)
    lr: float = Field(default=5e-6, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=64, ge=1)
    max_prompt_tokens: int = Field(default=256, ge=8)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    lora: bool = False
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    seed: int = 0
    save_every: int = Field(default=10, ge=0)
    resume: bool = False
    gateway_patience_s: float = Field(default=1800.0, gt=0)
    torch_threads: int | None = Field(default=None, ge=1)
    device: str = "cpu"

    @classmethod
    def build(cls, **values: Any) -> OnlineDPOConfig:
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError.from_validation(exc) from None


# ---- stalling on the gateway -------------------------------------------------------------------


def with_patience(
    call: Callable[[], T],
    what: str,
    *,
    url: str,
    patience_s: float,
    say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[T, float]:
    """Run ``call`` until it succeeds; retry transient gateway errors for ``patience_s``.

    Returns the result and the seconds spent waiting. Non-transient errors (401, 422, ...) are
    bugs or bad configuration and are raised at once.
    """
    start = time.monotonic()
    delay = 1.0
    while True:
        try:
            return call(), time.monotonic() - start
        except GatewayError as exc:
            waited = time.monotonic() - start
            if not exc.retryable:
                raise
            if waited + delay > patience_s:
                raise GatewayStalled(
                    f"{what}: gateway {url} still failing after {waited:.0f}s ({exc})"
                ) from exc
            say(
                f"[yellow]{what}: gateway {url} failed ({exc}); retrying in {delay:.0f}s "
                f"(waiting {waited:.0f}s so far, patience {patience_s:.0f}s)[/yellow]"
            )
            sleep(delay)
            # Backoff to 30 s: a restarting gateway is back in seconds, a longer outage need
            # not be hammered.
            delay = min(30.0, delay * 2)


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class RunTotals:
    """Cumulative counts kept in the checkpoint (for the summary and routing shares)."""

    routed: int = 0
    fallbacks: int = 0
    ties: int = 0
    feedback_applied: int = 0
    # Answered "duplicate": resent items (pending from a stalled run, or a retry whose first
    # answer was lost) that an earlier try had applied. applied + duplicate = delivered.
    feedback_duplicate: int = 0
    # Answered "unknown": the gateway no longer knows the route id (its store lost it, the
    # record expired, or the namespace was reset). Counted, warned about, in the summary.
    feedback_unknown: int = 0
    rm_counts: dict[str, int] = field(default_factory=dict)

    def shares(self) -> dict[str, float]:
        if not self.routed:
            return {}
        return {k: v / self.routed for k, v in sorted(self.rm_counts.items())}


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1).encode())


def prompt_batch(n_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """The prompt indices of ``step``: an epoch-wise shuffle, so every prompt comes in turn.

    >>> prompt_batch(5, 2, 0, 0) == prompt_batch(5, 2, 0, 0)
    True
    >>> sorted(sum((prompt_batch(4, 2, s, 1) for s in range(2)), []))
    [0, 1, 2, 3]
    """
    out: list[int] = []
    start = step * per_step
    for pos in range(start, start + per_step):
        epoch, off = divmod(pos, n_prompts)
        perm = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        out.append(int(perm[off]))
    return out


def pair_indices(k: int, limit: int | None, rng: np.random.Generator) -> list[tuple[int, int]]:
    """All (i, j) with i < j of ``k`` samples, or ``limit`` of them at random.

    >>> pair_indices(3, None, np.random.default_rng(0))
    [(0, 1), (0, 2), (1, 2)]
    """
    allp = [(i, j) for i in range(k) for j in range(i + 1, k)]
    if limit is None or limit >= len(allp):
        return allp
    pick = sorted(rng.choice(len(allp), size=limit, replace=False).tolist())
    return [allp[i] for i in pick]


class OnlineDPOTrainer:
    """One training run; :meth:`run` does every step and returns the summary.

    >>> cfg = OnlineDPOConfig(gateway="http://127.0.0.1:8080", policy="smollm2",
    ...                       out_dir="runs/dpo1", steps=20)                # doctest: +SKIP
    >>> OnlineDPOTrainer(cfg).run()["routing_share"]                        # doctest: +SKIP
    {'length': 0.41, 'verifier': 0.59}
    """

    def __init__(
        self,
        config: OnlineDPOConfig,
        *,
        client: GatewayClient | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = config
        self.out = Path(config.out_dir)
        self.say = say or _console_say
        key = config.api_key.get_secret_value() if config.api_key else None
        # The client's own retries are short; the trainer's patience loop does the long wait.
        self.client = client or GatewayClient(
            config.gateway,
            api_key=key,
            timeouts=Timeouts(connect=3.0, read=300.0),
            retry=RetryPolicy(retries=2, base_s=0.5, max_s=2.0),
        )
        self.totals = RunTotals()
        self.step = 0
        self.namespace = config.namespace or ""

    # ---- setup ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        import torch

        from reward_router.models import load_causal_lm

        cfg = self.cfg
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        ckpt = self.out / CHECKPOINT
        state: dict[str, Any] | None = None
        if ckpt.exists():
            if not cfg.resume:
                raise ConfigError(
                    "out_dir", f"{self.out} already holds a run; pass --resume or use a new folder"
                )
            state = json.loads((ckpt / STATE).read_text())
        self.out.mkdir(parents=True, exist_ok=True)
        self.prompts: list[PromptItem] = resolve_prompts(cfg.prompts, seed=cfg.seed)
        self.say(f"{len(self.prompts)} prompts from {cfg.prompts}")

        policy, self.tok = load_causal_lm(cfg.policy, device=cfg.device)
        self.tok.padding_side = "left"
        if cfg.lora:
            from peft import LoraConfig, PeftModel, get_peft_model

            if state is not None:
                policy = PeftModel.from_pretrained(policy, str(ckpt), is_trainable=True)
            else:
                lcfg = LoraConfig(
                    r=cfg.lora_r,
                    lora_alpha=cfg.lora_alpha,
                    target_modules="all-linear",
                    lora_dropout=0.0,
                )
                policy = get_peft_model(policy, lcfg)
            # The reference is the base with the adapter switched off: no second copy.
            self.ref = None
        else:
            import copy

            self.ref = copy.deepcopy(policy).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)
            if state is not None:
                from safetensors.torch import load_file

                saved = load_file(str(ckpt / "model.safetensors"))
                # Tied weights were saved under one name; every other key must match.
                res = policy.load_state_dict(saved, strict=False)
                tied = {k for k in res.missing_keys if k.endswith("lm_head.weight")}
                if res.unexpected_keys or set(res.missing_keys) - tied:
                    raise ConfigError(
                        "policy",
                        f"checkpoint {ckpt} does not fit {cfg.policy}: missing "
                        f"{sorted(set(res.missing_keys) - tied)[:5]}, unexpected "
                        f"{sorted(res.unexpected_keys)[:5]}",
                    )
        self.policy = policy
        params = [p for p in policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if state is not None:
            self._load_optimizer(ckpt / "optimizer.safetensors")
            self.step = int(state["step"])
            self.namespace = str(state["namespace"])
            self.totals = RunTotals(**state["totals"])
            self._trim_log(self.step)
            self.say(f"resumed {self.out} at step {self.step} (namespace {self.namespace})")
        if not self.namespace:
            self.namespace = f"dpo-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.seed}"
        try:
            # A resumed run that never routed (it stalled here) creates its namespace anew.
            self._ensure_namespace(resumed=state is not None and self.totals.routed > 0)
        except GatewayStalled:
            self.save()  # so --resume continues from here
            raise
        self._flush_pending()

    def _ensure_namespace(self, *, resumed: bool) -> None:
        """A new run creates its namespace (the gateway's policy defaults; an existing one of
        that name is joined as it is); a resumed run needs the one it learned in, and stops if
        the gateway lost it rather than carry on with a namespace re-created from defaults."""
        cfg = self.cfg

        def call(fn: Callable[[], T], what: str) -> T:
            out, _ = with_patience(
                fn, what, url=cfg.gateway, patience_s=cfg.gateway_patience_s, say=self.say
            )
            return out

        if resumed:
            try:
                call(lambda: self.client.posteriors(self.namespace), "namespace")
            except NamespaceNotFound:
                raise ConfigError(
                    "namespace",
                    f"{self.namespace!r}, the namespace this run learned in, is gone from the "
                    f"gateway {cfg.gateway} (deleted, or its store lost it): resuming would "
                    "route with a fresh prior; start a new run (new --out) or re-create it",
                ) from None
            return
        try:
            info = call(lambda: self.client.create_namespace(self.namespace), "namespace")
        except NamespaceConflict:
            self.say(f"namespace {self.namespace} exists with its own policy: joining it")
            return
        if not info.created:
            self.say(f"namespace {self.namespace} exists already: joining it")

    def _load_optimizer(self, path: Path) -> None:
        import torch
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        sd = self.opt.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            idx, key = name.split(".", 1)
            state.setdefault(int(idx), {})[key] = t
        sd["state"] = state
        self.opt.load_state_dict(sd)

    def _trim_log(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint (a crashed run's unsaved steps)."""
        log = self.out / "log.jsonl"
        if not log.exists():
            return
        keep = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        log.write_text("".join(ln + "\n" for ln in keep))

    # ---- checkpoints -------------------------------------------------------------------------

    def save(self) -> Path:
        """Write ``checkpoint/`` atomically (a new folder renamed over the old one)."""
        from safetensors.torch import save_file

        final = self.out / CHECKPOINT
        tmp = self.out / (CHECKPOINT + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.cfg.lora:
            self.policy.save_pretrained(str(tmp))
        else:
            sd = {k: v.detach().contiguous() for k, v in self.policy.state_dict().items()}
            # Tied weights share storage; safetensors refuses aliases, so keep one name each.
            seen: set[int] = set()
            for k in list(sd):
                ptr = sd[k].data_ptr()
                if ptr in seen:
                    del sd[k]
                seen.add(ptr)
            save_file(sd, str(tmp / "model.safetensors"))
            self.policy.config.save_pretrained(str(tmp))
        self.tok.save_pretrained(str(tmp))
        opt_tensors = {}
        for idx, st in self.opt.state_dict()["state"].items():
            for key, val in st.items():
                opt_tensors[f"{idx}.{key}"] = val.detach().contiguous()
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {
            "step": self.step,
            "namespace": self.namespace,
            "totals": self.totals.__dict__,
            "config": json.loads(self.cfg.model_dump_json(exclude={"api_key"})),
        }
        _atomic_json(tmp / STATE, state)
        old = self.out / (CHECKPOINT + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    # ---- feedback that must not be lost ------------------------------------------------------

    def _post_feedback(self, items: list[tuple[str, float]]) -> tuple[dict[str, int], float]:
        pending = self.out / PENDING
        _atomic_json(pending, items)
        res, waited = with_patience(
            lambda: self.client.feedback(items),
            "feedback",
            url=self.cfg.gateway,
            patience_s=self.cfg.gateway_patience_s,
            say=self.say,
        )
        pending.unlink(missing_ok=True)
        self.totals.feedback_applied += res.applied
        self.totals.feedback_duplicate += res.duplicate
        self.totals.feedback_unknown += res.unknown
        if res.unknown:
            self.say(
                f"[yellow]feedback: the gateway did not know {res.unknown} of {len(items)} "
                f"route ids (expired, reset, or its store lost them); "
                f"{self.totals.feedback_unknown} so far, in the summary[/yellow]"
            )
        return res.model_dump(), waited

    def _flush_pending(self) -> None:
        pending = self.out / PENDING
        if pending.exists():
            items = [(str(r), float(v)) for r, v in json.loads(pending.read_text())]
            self.say(f"sending {len(items)} feedback items left pending by the last run")
            out, _ = self._post_feedback(items)
            self.say(f"pending feedback: {out}")

    # ---- one step ----------------------------------------------------------------------------

    def _generate(self, items: Sequence[PromptItem], gen_seed: int) -> tuple[Any, Any]:
        """Prompt token ids (one per prompt) and k response token ids per prompt."""
        import torch
        from transformers import GenerationConfig

        cfg, tok = self.cfg, self.tok
        k = cfg.samples_per_prompt
        prompt_ids: list[list[int]] = []
        for it in items:
            text = tok.apply_chat_template(it.messages, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            prompt_ids.append(ids[-cfg.max_prompt_tokens :])  # keep the latest turns
        rows = [p for p in prompt_ids for _ in range(k)]
        width = max(len(r) for r in rows)
        pad = int(tok.pad_token_id)
        ids_t = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        gcfg = GenerationConfig(
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=0,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        torch.manual_seed(gen_seed)
        self.policy.eval()
        with torch.no_grad():
            out = self.policy.generate(
                input_ids=ids_t.to(cfg.device),
                attention_mask=attn.to(cfg.device),
                generation_config=gcfg,
            )
        eos = tok.eos_token_id
        responses: list[list[list[int]]] = [[] for _ in items]
        for r, row in enumerate(out[:, width:].tolist()):
            resp = row[: row.index(eos) + 1] if eos in row else row
            responses[r // k].append(resp)
        return prompt_ids, responses

    def _logps(self, prompt_ids: list[list[int]], responses: list[list[list[int]]]) -> Any:
        """Policy (with grad) and reference (no grad) log-probs of every sample, (S,) each."""
        import torch

        from trainer_client.dpo import sequence_logps

        flat_p = [p for p, rs in zip(prompt_ids, responses, strict=True) for _ in rs]
        flat_r = [r for rs in responses for r in rs]
        pad = int(self.tok.pad_token_id)
        self.policy.train()
        pol = sequence_logps(self.policy, flat_p, flat_r, pad_id=pad)
        with torch.no_grad():
            if self.ref is not None:
                ref = sequence_logps(self.ref, flat_p, flat_r, pad_id=pad)
            else:
                with self.policy.disable_adapter():
                    ref = sequence_logps(self.policy, flat_p, flat_r, pad_id=pad)
        return pol, ref

    def train_step(self) -> dict[str, Any]:
        """One step of the loop; returns its log record."""
        import torch

        from reward_router.answers import answers_match, final_answer
        from trainer_client.dpo import dpo_losses, tie_losses

        cfg, step = self.cfg, self.step + 1
        t0 = time.monotonic()
        batch = prompt_batch(len(self.prompts), cfg.prompts_per_step, step - 1, cfg.seed)
        items = [self.prompts[i] for i in batch]
        prompt_ids, responses = self._generate(items, gen_seed=cfg.seed * 1_000_003 + step)
        texts = [
            [self.tok.decode(r, skip_special_tokens=True).strip() for r in rs] for rs in responses
        ]
        rng = np.random.default_rng([cfg.seed, step, 7])
        k = cfg.samples_per_prompt
        pairs: list[tuple[int, int, int]] = []  # (prompt, i, j)
        identical = 0
        for p in range(len(items)):
            for i, j in pair_indices(k, cfg.pairs_per_prompt, rng):
                if texts[p][i] == texts[p][j]:
                    identical += 1
                    continue
                pairs.append((p, i, j))

        correct = [
            answers_match(ans, ref_answer)
            for it, ts in zip(items, texts, strict=True)
            if (ref_answer := it.reference) is not None
            for t in ts
            if (ans := final_answer(t)) is not None
        ]
        n_math = sum(len(texts[p]) for p in range(len(items)) if items[p].reference is not None)
        rec: dict[str, Any] = {
            "step": step,
            "prompts": len(items),
            "domains": dict(Counter(it.domain for it in items)),
            "samples": len(items) * k,
            "pairs": len(pairs),
            "identical_skipped": identical,
            "answer_accuracy": (sum(correct) / n_math) if n_math else None,
            "mean_response_tokens": float(np.mean([len(r) for rs in responses for r in rs])),
        }
        if not pairs:
            rec.update(loss=None, routed=0, note="every pair identical; nothing to route")
            self.step = step
            return rec

        payload = [
            {
                "id": f"s{step}-p{p}-{i}-{j}",
                "prompt": items[p].messages,
                "response_a": texts[p][i],
                "response_b": texts[p][j],
                **({"reference": items[p].reference} if items[p].reference is not None else {}),
            }
            for p, i, j in pairs
        ]
        routed, wait_route = with_patience(
            lambda: self.client.route(payload, namespace=self.namespace),
            "route",
            url=cfg.gateway,
            patience_s=cfg.gateway_patience_s,
            say=self.say,
        )
        results = routed.results

        t_gen = time.monotonic() - t0 - wait_route
        t1 = time.monotonic()
        pol, ref = self._logps(prompt_ids, responses)
        offsets = np.cumsum([0] + [len(rs) for rs in responses])
        w_idx, l_idx, is_tie = [], [], []
        for (p, i, j), res in zip(pairs, results, strict=True):
            sa, sb = int(offsets[p] + i), int(offsets[p] + j)
            w, lo = (sb, sa) if res.preferred == "b" else (sa, sb)
            w_idx.append(w)
            l_idx.append(lo)
            is_tie.append(res.preferred == "tie")
        wi, li = torch.tensor(w_idx), torch.tensor(l_idx)
        tie = torch.tensor(is_tie)
        losses, margins = dpo_losses(pol[wi], pol[li], ref[wi], ref[li], beta=cfg.beta)
        per_pair = torch.where(tie, tie_losses(margins), losses)
        trained = ~tie
        if bool(trained.any()):
            loss = losses[trained].mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.policy.parameters() if p.requires_grad], cfg.max_grad_norm
                )
            )
            self.opt.step()
        else:
            loss, grad_norm = None, 0.0
        self.step = step
        t_update = time.monotonic() - t1

        rewards = [-float(v) for v in per_pair.detach()]
        counts = Counter(r.rm for r in results)
        # Counted before the feedback goes out: a run that stalls posting it checkpoints this
        # step (trained, its feedback pending for the next run), so the totals include it.
        self.totals.routed += len(results)
        self.totals.fallbacks += sum(r.fallback for r in results)
        self.totals.ties += int(tie.sum())
        for name, n in counts.items():
            self.totals.rm_counts[name] = self.totals.rm_counts.get(name, 0) + n
        m = margins.detach()[trained]
        rec.update(
            routed=len(results),
            ties=int(tie.sum()),
            loss=None if loss is None else float(loss.detach()),
            mean_reward=float(np.mean(rewards)),
            margin_mean=float(m.mean()) if len(m) else None,
            margin_accuracy=float((m > 0).float().mean()) if len(m) else None,
            grad_norm=grad_norm,
            rm_counts=dict(sorted(counts.items())),
            rm_share={n: c / len(results) for n, c in sorted(counts.items())},
            rm_by_domain=_by_domain([items[p].domain for p, _, _ in pairs], results),
            reward_by_rm=_mean_by_rm(results, rewards),
            fallbacks=sum(r.fallback for r in results),
            feedback={"pending": len(results)},
            gateway_wait_s=round(wait_route, 3),
            generate_s=round(t_gen, 3),
            update_s=round(t_update, 3),
        )
        try:
            fb, wait_fb = self._post_feedback(
                [(r.route_id, rw) for r, rw in zip(results, rewards, strict=True)]
            )
        except GatewayStalled as exc:
            rec["step_s"] = round(time.monotonic() - t0, 3)
            exc.record = rec  # run() logs it: the step happened, its feedback is on disk
            raise
        rec.update(
            feedback=fb,
            gateway_wait_s=round(wait_route + wait_fb, 3),
            step_s=round(time.monotonic() - t0, 3),
        )
        return rec

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Every step up to ``steps``, with logs, checkpoints and a summary; returns the summary."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._setup()
        cfg = self.cfg
        self.say(
            f"Online DPO: {cfg.policy} -> gateway {cfg.gateway} namespace {self.namespace}, "
            f"steps {self.step + 1}..{cfg.steps}"
        )
        log_path = self.out / "log.jsonl"
        cols = (
            TextColumn("[bold]train-dpo"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
        )
        with Progress(*cols, transient=False) as progress:
            task = progress.add_task("", total=cfg.steps, completed=self.step)
            while self.step < cfg.steps:
                try:
                    rec = self.train_step()
                except GatewayStalled as exc:
                    # The optimiser step may have happened; keep it with its pending feedback.
                    if exc.record is not None:
                        with log_path.open("a") as fh:
                            fh.write(json.dumps(exc.record) + "\n")
                    self.save()
                    raise
                with log_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                desc = _describe(rec)
                progress.update(task, completed=self.step, description=desc)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
        self.save()
        summary = {
            "steps": self.step,
            "namespace": self.namespace,
            "routed": self.totals.routed,
            "fallbacks": self.totals.fallbacks,
            "ties": self.totals.ties,
            "feedback_applied": self.totals.feedback_applied,
            "feedback_duplicate": self.totals.feedback_duplicate,
            "feedback_unknown": self.totals.feedback_unknown,
            "routing_share": self.totals.shares(),
            "checkpoint": str(self.out / CHECKPOINT),
        }
        _atomic_json(self.out / "summary.json", summary)
        self.say(f"done: {json.dumps(summary)}")
        return summary

    def close(self) -> None:
        self.client.close()


def _by_domain(domains: Sequence[str], results: Sequence[Any]) -> dict[str, dict[str, int]]:
    """How many pairs of each prompt domain went to each RM (routing should differ by domain)."""
    out: dict[str, dict[str, int]] = {}
    for d, r in zip(domains, results, strict=True):
        out.setdefault(d, {})
        out[d][r.rm] = out[d].get(r.rm, 0) + 1
    return out


def _mean_by_rm(results: Sequence[Any], rewards: Sequence[float]) -> dict[str, float]:
    """The mean reward (−DPO loss) posted for the pairs each RM labelled in a step."""
    sums: dict[str, list[float]] = {}
    for r, rw in zip(results, rewards, strict=True):
        sums.setdefault(r.rm, []).append(rw)
    return {rm: float(np.mean(v)) for rm, v in sorted(sums.items())}


def _describe(rec: dict[str, Any]) -> str:
    loss = rec.get("loss")
    share = " ".join(f"{k}={v:.2f}" for k, v in (rec.get("rm_share") or {}).items())
    acc = rec.get("answer_accuracy")
    parts = [f"loss={loss:.4f}" if loss is not None else "loss=-", share]
    if acc is not None:
        parts.append(f"math_acc={acc:.2f}")
    if rec.get("fallbacks"):
        parts.append(f"fallbacks={rec['fallbacks']}")
    return " ".join(p for p in parts if p)


def _console_say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(msg)
