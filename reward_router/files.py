"""Files written whole or not at all: a reader (another process, a restart after a crash)
sees the old file or the new one, never a torn one.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write(d / "a.json", b"{}")
>>> (d / "a.json").read_bytes()
b'{}'
>>> with atomic_path(d / "b.bin") as tmp:
...     _ = tmp.write_bytes(b"xy")
>>> sorted(p.name for p in d.iterdir())
['a.json', 'b.bin']
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | Path, *, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``target`` to write to; when the block succeeds it replaces
    ``target`` in one rename (readable by others: ``mkstemp`` would leave it 0600), and when
    it fails the temporary file is removed and ``target`` is untouched."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(target: str | Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_path`)."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
