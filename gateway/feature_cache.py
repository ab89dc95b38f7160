"""Pair-side embeddings on disk: encoding a text costs ~20 ms of CPU, reading it back ~nothing,
so replays, training runs and gateway restarts share what was encoded once.

>>> cache = EmbeddingCache(Path(".cache/emb"), "minilm", 256)   # doctest: +SKIP
>>> cache.put(["9f3a..."], rows); cache.get(["9f3a..."])        # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reward_router.files import atomic_path, atomic_write

log = logging.getLogger("gateway.features")  # the name it logged under before the split

#: Bumped when the text layout or pooling changes, so old cache entries stop matching.
CACHE_FORMAT = "pairfeat-v1"


class EmbeddingCache:
    """Embeddings on disk, keyed by a hex content hash, in append-only shard files.

    One folder per (encoder ref, max_length); each :meth:`put` writes one ``.npz`` shard (keys
    and float32 rows) to a temporary name and renames it into place, so concurrent writers never
    see or leave a half-written shard. Readers pick up shards written by other processes on
    their next lookup. Duplicate keys across shards are harmless (same content, same value).
    """

    def __init__(self, root: Path, encoder_ref: str, max_length: int) -> None:
        space = hashlib.sha256(f"{CACHE_FORMAT}\0{encoder_ref}\0{max_length}".encode()).hexdigest()
        self.folder = Path(root) / space[:20]
        self.encoder_ref = encoder_ref
        self.max_length = max_length
        self._rows: dict[str, np.ndarray] = {}
        self._loaded: set[str] = set()

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached rows among ``keys`` (missing keys are absent from the result)."""
        if any(k not in self._rows for k in keys):
            self._refresh()
        return {k: self._rows[k] for k in keys if k in self._rows}

    def put(self, keys: Sequence[str], rows: np.ndarray) -> None:
        """Store rows under keys, as one new shard."""
        if len(keys) == 0:
            return
        rows = np.asarray(rows, dtype=np.float32)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        if not meta.exists():
            info = {"encoder_ref": self.encoder_ref, "max_length": self.max_length}
            atomic_write(meta, json.dumps(info, indent=2).encode())
        name = f"shard-{uuid.uuid4().hex}.npz"
        with atomic_path(self.folder / name) as tmp, tmp.open("wb") as fh:
            np.savez(fh, keys=np.asarray(keys, dtype="S64"), rows=rows)
        self._loaded.add(name)
        for k, row in zip(keys, rows, strict=True):
            self._rows[k] = row

    def _refresh(self) -> None:
        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("shard-*.npz")):
            if shard.name in self._loaded:
                continue
            try:
                with np.load(shard, allow_pickle=False) as z:
                    keys, rows = z["keys"], z["rows"]
            except (OSError, ValueError, KeyError) as exc:
                # A foreign or damaged file must not stop a run; it is only a cache.
                log.warning("skipping unreadable embedding shard %s: %s", shard, exc)
                self._loaded.add(shard.name)
                continue
            for k, row in zip(keys, rows, strict=True):
                self._rows[k.decode()] = row
            self._loaded.add(shard.name)

    def __len__(self) -> int:
        self._refresh()
        return len(self._rows)
