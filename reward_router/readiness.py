"""Is a reward-router service up? Every service answers ``GET /readyz`` with 200 once it can
serve (the gateway: its store and an RM; an RM service: its model loaded).

>>> is_ready("http://127.0.0.1:9")   # nothing listens on port 9
False
"""

from __future__ import annotations

import httpx


def is_ready(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the service at ``url`` (its base URL) answers ``/readyz`` with 200."""
    try:
        return httpx.get(url.rstrip("/") + "/readyz", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False
