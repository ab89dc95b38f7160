"""Prompts for online training runs: the shipped chat / safety / math mix, or any JSONL.

A prompt is a list of chat messages ending with the user's turn, an optional reference answer
(math: the number after GSM8K's ``####``, so the ``verifier`` RM can be right and the trainer
can measure the policy's answer accuracy) and a domain tag for the logs.

JSONL format, one object a line: ``prompt`` (a string or a list of ``{role, content}``) or
``question``; optionally ``reference`` (or a GSM8K ``answer`` ending in ``#### N``) and
``domain``.

>>> item = parse_prompt_line({"question": "2+3?", "answer": "2+3=5\\n#### 5"}, "p.jsonl", 1)
>>> (item.messages[-1]["content"], item.reference, item.domain)
('2+3?', '5', 'math')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reward_router.data import iter_jsonl, load_pairs, prompt_messages
from reward_router.errors import DataFormatError

#: The project's shipped data (a copy of the shared data; see data/README.md).
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SHIPPED = "shipped"
_GSM8K_FINAL = re.compile(r"####\s*([^\n]+)")


@dataclass(frozen=True)
class PromptItem:
    """One training prompt."""

    messages: list[dict[str, str]]
    reference: str | None = None
    domain: str = "chat"


def parse_prompt_line(obj: dict[str, Any], path: str, lineno: int) -> PromptItem:
    """One JSONL object -> :class:`PromptItem`; a bad line names its file, line and field."""
    raw = obj.get("prompt", obj.get("question"))
    if raw is None:
        raise DataFormatError(path, lineno, "prompt", "missing (give 'prompt' or 'question')")
    if isinstance(raw, str):
        if not raw.strip():
            raise DataFormatError(path, lineno, "prompt", "must not be empty")
        messages = prompt_messages(raw)
    elif isinstance(raw, list) and raw and all(isinstance(m, dict) for m in raw):
        if not all(isinstance(m.get("content"), str) and "role" in m for m in raw):
            raise DataFormatError(path, lineno, "prompt", "messages need 'role' and 'content'")
        messages = prompt_messages(raw)
    else:
        raise DataFormatError(path, lineno, "prompt", "must be a string or a list of messages")
    if messages[-1]["role"] != "user":
        raise DataFormatError(path, lineno, "prompt", "the last message must be the user's")
    reference = obj.get("reference")
    if reference is None and isinstance(obj.get("answer"), str):
        m = _GSM8K_FINAL.search(obj["answer"])
        reference = m.group(1).strip() if m else None
    if reference is not None and not isinstance(reference, str | int | float):
        raise DataFormatError(path, lineno, "reference", "must be a string or a number")
    domain = obj.get("domain") or ("math" if reference is not None else "chat")
    return PromptItem(messages, None if reference is None else str(reference), str(domain))


def load_prompts(path: str | Path) -> list[PromptItem]:
    """All prompts of a JSONL(.gz) file.

    >>> load_prompts("no-such.jsonl")
    Traceback (most recent call last):
    ...
    reward_router.errors.DataFormatError: no-such.jsonl: file not found
    """
    items = [parse_prompt_line(obj, str(path), n) for n, obj in iter_jsonl(path)]
    if not items:
        raise DataFormatError(str(path), None, None, "no prompts in file")
    return items


def shipped_mix(
    per_domain: int = 200, *, seed: int = 0, data_dir: Path = DATA_DIR
) -> list[PromptItem]:
    """An equal mix of the shipped chat and safety prompts (hh-rlhf) and math (GSM8K train).

    Prompts are de-duplicated by group (one per conversation); multi-turn prompts keep their
    history. Chosen deterministically by ``seed``; interleaved chat, safety, math.
    """
    rng = np.random.default_rng(seed)
    by_domain: dict[str, list[PromptItem]] = {"chat": [], "safety": []}
    seen: set[str] = set()
    for pair in load_pairs(data_dir / "pairs" / "hh-rlhf.jsonl.gz"):
        if pair.domain not in by_domain or pair.group in seen:
            continue
        if not pair.prompt or pair.prompt[-1]["role"] != "user":
            continue
        seen.add(pair.group)
        by_domain[pair.domain].append(PromptItem(list(pair.prompt), None, pair.domain))
    gsm = data_dir / "prompts" / "gsm8k-train.jsonl.gz"
    by_domain["math"] = [parse_prompt_line(o, str(gsm), n) for n, o in iter_jsonl(gsm)]
    picked: dict[str, list[PromptItem]] = {}
    for name, items in by_domain.items():
        idx = rng.permutation(len(items))[:per_domain]
        picked[name] = [items[i] for i in idx]
    out: list[PromptItem] = []
    for i in range(per_domain):
        out.extend(picked[name][i] for name in ("chat", "safety", "math") if i < len(picked[name]))
    return out


def resolve_prompts(spec: str, *, seed: int = 0) -> list[PromptItem]:
    """``"shipped"`` (the mix above) or a JSONL path."""
    if spec == SHIPPED:
        return shipped_mix(seed=seed)
    return load_prompts(spec)
