"""``hf``: any Hugging Face sequence-classification reward model folder (one label).

The same code path serves a 7B Skywork-Reward or InternLM2-reward on a GPU and our MiniLM
specialists on a CPU:

* a tokenizer with a chat template (decoder RMs) gets the conversation rendered by that
  template, the response as the final assistant turn;
* a tokenizer without one (BERT-style encoders) gets the prompt text and the response as a
  text pair (``[CLS] prompt [SEP] response [SEP]``).

Truncation policy ``left`` keeps the *end* of each part (the latest turns of the prompt, the
end of the response where a final answer sits) and reports the item as truncated; the
training code of ``reward-router rm train`` uses :func:`encode_batch` too, so a trained model is
served exactly as it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reward_router.data import Message, prompt_text
from reward_router.pooling import mean_pool
from services.backends.base import Backend, Scored, ScoreInput

#: How a one-output head reads the encoder (``reward_pooling`` in a model folder's
#: ``config.json``; absent means ``cls``): ``cls`` is the folder's own sequence-classification
#: forward (BERT's pooler over ``[CLS]``, a decoder's last token), ``mean`` feeds the head the
#: mean of the last hidden states over the real tokens, the pooling sentence encoders such as
#: all-MiniLM-L6-v2 were trained for (``reward-router rm train --pooling mean``).
POOLINGS = ("cls", "mean")


def reward_pooling(model: Any) -> str:
    """A loaded model's ``reward_pooling``, checked: ``mean`` needs an encoder with a
    ``classifier`` head that takes the pooled vector (BERT-style sequence classifiers)."""
    from reward_router.errors import ConfigError

    pooling = getattr(model.config, "reward_pooling", "cls")
    if pooling not in POOLINGS:
        raise ConfigError("model", f"reward_pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "mean" and not hasattr(model, "classifier"):
        raise ConfigError(
            "model", f"reward_pooling 'mean' needs a BERT-style classifier head, not {type(model)}"
        )
    return str(pooling)


def rewards(model: Any, inputs: dict[str, Any], pooling: str = "cls") -> Any:
    """One reward per row of an encoded batch, read as the model was trained (``pooling``)."""
    if pooling == "cls":
        return model(**inputs).logits[:, 0]
    hidden = model.base_model(**inputs).last_hidden_state
    return model.classifier(mean_pool(hidden, inputs["attention_mask"]))[:, 0]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_batch(
    tokenizer: Any,
    prompts: Sequence[list[Message]],
    responses: Sequence[str],
    max_length: int,
) -> tuple[dict[str, Any], list[bool]]:
    """Tokenize (prompt, response) pairs for a reward model; returns the padded tensors and,
    per item, whether it had to be cut to ``max_length`` tokens.

    >>> enc, cut = encode_batch(tok, [[{"role": "user", "content": "hi"}]], ["hello"], 256)
    ...                                                                 # doctest: +SKIP
    """
    return _encode(tokenizer, prompts, responses, max_length, padding=True, return_tensors="pt")


def encode_ids(
    tokenizer: Any,
    prompts: Sequence[list[Message]],
    responses: Sequence[str],
    max_length: int,
) -> tuple[list[list[int]], list[bool]]:
    """The token ids :func:`encode_batch` feeds the model, one unpadded list per item (what the
    ``vllm`` backend sends, so a server scores exactly the tokens this backend would)."""
    enc, cut = _encode(tokenizer, prompts, responses, max_length, padding=False)
    return [list(ids) for ids in enc["input_ids"]], cut


def _encode(
    tokenizer: Any,
    prompts: Sequence[list[Message]],
    responses: Sequence[str],
    max_length: int,
    **out: Any,
) -> tuple[dict[str, Any], list[bool]]:
    tokenizer.truncation_side = "left"
    tokenizer.padding_side = "right"
    if has_chat_template(tokenizer):
        texts = [
            tokenizer.apply_chat_template([*p, {"role": "assistant", "content": r}], tokenize=False)
            for p, r in zip(prompts, responses, strict=True)
        ]
        # The template writes the special tokens (a Llama-3 template writes BOS itself).
        full = tokenizer(texts, add_special_tokens=False)["input_ids"]
        enc = tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=max_length, **out
        )
    else:
        ptexts = [prompt_text(p) for p in prompts]
        full = tokenizer(ptexts, list(responses))["input_ids"]
        # longest_first trims whichever part is longer, from the left (truncation_side):
        # a long prompt loses its oldest turns before the response loses anything.
        enc = tokenizer(
            ptexts, list(responses), truncation="longest_first", max_length=max_length, **out
        )
    return dict(enc), [len(ids) > max_length for ids in full]


class HFBackend(Backend):
    """A local ``AutoModelForSequenceClassification`` folder with ``num_labels == 1``."""

    kind = "hf"

    def load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from reward_router.errors import ConfigError

        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        dtype = "auto" if s.dtype == "auto" else getattr(torch, s.dtype)
        try:
            # trust_remote_code passed explicitly: left as None, transformers would ask on a
            # terminal whether to run a folder's own code; weights only from safetensors.
            self.tokenizer = AutoTokenizer.from_pretrained(
                str(s.model), trust_remote_code=s.trust_remote_code
            )
            model = AutoModelForSequenceClassification.from_pretrained(
                str(s.model),
                dtype=dtype,
                trust_remote_code=s.trust_remote_code,
                use_safetensors=True,
            )
        except OSError as exc:
            raise ConfigError(
                "model", f"cannot load a Hugging Face model from {s.model}: {exc}"
            ) from exc
        if model.config.num_labels != 1:
            raise ConfigError(
                "model", f"a reward model has one output label, {s.model} has {model.num_labels}"
            )
        if self.tokenizer.pad_token is None:
            # Decoder RMs often ship without a pad token; padding on the right with EOS is
            # safe because the score is read at the last non-pad position.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.pooling = reward_pooling(model)
        self.model = model.to(s.device).eval()
        self._torch = torch

    def score_batch(self, items: Sequence[ScoreInput]) -> list[Scored]:
        s = self.settings
        prompts, responses = [i.prompt for i in items], [i.response for i in items]
        enc, cut = encode_batch(self.tokenizer, prompts, responses, s.max_length)
        keep = [k for k in range(len(items)) if not (cut[k] and s.truncation == "error")]
        out = [Scored(float("nan"), too_long=True)] * len(items)
        if not keep:
            return out
        if len(keep) < len(items):
            # Re-encode without the refused items so they do not set the padded length.
            enc, _ = encode_batch(
                self.tokenizer,
                [prompts[k] for k in keep],
                [responses[k] for k in keep],
                s.max_length,
            )
        torch = self._torch
        inputs = {k: v.to(s.device) for k, v in enc.items()}
        with torch.inference_mode():
            logits = rewards(self.model, inputs, self.pooling).float().cpu().tolist()
        for k, score in zip(keep, logits, strict=True):
            out[k] = Scored(float(score), truncated=cut[k])
        return out
