"""A namespace's folded state at a log position, as bytes (``.npz``) for the store.

A snapshot holds the posteriors' natural parameters, the per-RM observation counts and a JSON
head (its log position ``seq``, the normaliser's state, the route id of the entry at ``seq``).
Only the Bayesian family keeps everything it learned in ``.posteriors``; other learning
policies (laser) are always rebuilt from the whole log.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np


def snapshottable(policy: Any) -> bool:
    """Whether ``policy`` keeps all it learned in a ``GaussianPosteriors`` (the Bayesian family)."""
    from gateway.routing import GaussianPosteriors

    return isinstance(getattr(policy, "posteriors", None), GaussianPosteriors)


@dataclass
class Snapshot:
    posteriors: Any  # GaussianPosteriors
    obs_counts: np.ndarray
    seq: int
    normalizer_state: dict[str, Any] | None
    last_route_id: str | None


def encode(
    posteriors: Any,
    obs_counts: np.ndarray,
    seq: int,
    normalizer_state: dict[str, Any] | None,
    last_route_id: str | None,
) -> bytes:
    arrays = dict(posteriors.to_arrays())
    arrays["obs_counts"] = obs_counts.copy()
    head = json.dumps(
        {"seq": seq, "normalizer": normalizer_state, "last_route_id": last_route_id}
    ).encode()
    arrays["head"] = np.frombuffer(head, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode(blob: bytes) -> Snapshot:
    """The snapshot in ``blob``; ``ValueError`` / ``KeyError`` / ``TypeError`` / ``OSError``
    when it is unreadable (another version, another policy config)."""
    from gateway.routing import GaussianPosteriors

    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    head = json.loads(arrays.pop("head").tobytes())
    counts = arrays.pop("obs_counts")
    return Snapshot(
        posteriors=GaussianPosteriors.from_arrays(arrays),
        obs_counts=counts.astype(np.int64),
        seq=int(head["seq"]),
        normalizer_state=head["normalizer"],
        last_route_id=head.get("last_route_id"),
    )
