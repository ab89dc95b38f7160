"""Scoring backends, one file each; :func:`make_backend` picks one by ``settings.backend``.

Backends are imported lazily so a rule-based service never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from services.backends.base import Backend, Compared, PairInput, Scored, ScoreInput

if TYPE_CHECKING:
    from services.settings import ServiceSettings

__all__ = ["Backend", "Compared", "PairInput", "ScoreInput", "Scored", "make_backend"]

_CLASSES = {
    "hf": ("services.backends.hf", "HFBackend"),
    "vllm": ("services.backends.vllm", "VLLMBackend"),
    "judge": ("services.backends.judge", "JudgeBackend"),
    "verifier": ("services.backends.verifier", "VerifierBackend"),
    "length": ("services.backends.length", "LengthBackend"),
}


def make_backend(settings: ServiceSettings) -> Backend:
    """The (not yet loaded) backend named by ``settings.backend``.

    >>> from services.settings import load_settings
    >>> make_backend(load_settings(None, name="len", backend="length")).kind
    'length'
    """
    module, cls = _CLASSES[settings.backend]
    backend: Backend = getattr(importlib.import_module(module), cls)(settings)
    return backend
