"""The start-up heap, out of the cyclic garbage collector's view.

A service loads torch, transformers, a model and FastAPI before its first request: hundreds of
thousands of objects that are never garbage. Python's full collections walk every tracked
object, so each one paused the event loop for 0.1-2 s, every request in flight waiting, and they
come whenever ~25 % more long-lived objects have piled up (docs/gateway.md, "Performance").
:func:`freeze_startup_heap` collects once and moves what survives to the permanent generation.
"""

from __future__ import annotations

import gc

_FROZEN = False


def freeze_startup_heap() -> bool:
    """``gc.collect(); gc.freeze()`` once per process; True if this call froze.

    Once: a second service started in the same process (tests) must not pin whatever the first
    left alive."""
    global _FROZEN
    if _FROZEN:
        return False
    gc.collect()
    gc.freeze()
    _FROZEN = True
    return True
