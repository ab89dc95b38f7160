"""Pooling a transformer's hidden states into one vector per sequence (torch tensors; torch is
not imported here: the caller's tensors bring it)."""

from __future__ import annotations

from typing import Any


def mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """Mean of ``hidden`` (batch, tokens, width) over the tokens where ``attention_mask`` is 1
    (a row without any counts as one token, so it pools to zeros, not NaN)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
