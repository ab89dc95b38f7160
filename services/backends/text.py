"""Token budgets shared by the backends that build their own prompts (judge, vllm)."""

from __future__ import annotations

from collections.abc import Sequence


def fit_lengths(lengths: Sequence[int], budget: int) -> list[int]:
    """Caps per part so the parts sum to at most ``budget``, cutting the longest parts first
    (water-filling): short parts are never cut to make room for a long one.

    >>> fit_lengths([10, 500, 40], 100)
    [10, 50, 40]
    >>> fit_lengths([3, 4], 100)
    [3, 4]
    """
    budget = max(0, budget)
    if sum(lengths) <= budget:
        return list(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    caps = [0] * len(lengths)
    left = budget
    for rank, i in enumerate(order):
        share = left // (len(lengths) - rank)
        caps[i] = min(lengths[i], share)
        left -= caps[i]
    return caps


def keep_tail(tokenizer: object, text: str, n_tokens: int) -> str:
    """``text`` cut to its last ``n_tokens`` tokens (the end holds the question / answer)."""
    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    if len(ids) <= n_tokens:
        return text
    return str(tokenizer.decode(ids[len(ids) - n_tokens :] if n_tokens else []))  # type: ignore[attr-defined]
