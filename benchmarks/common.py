"""Small helpers shared by the benchmark scripts (percentiles, CPU time of a process).

The scripts put the repository root on ``sys.path`` before importing this module, so it is
importable as ``benchmarks.common`` both from a script and from the tests.

>>> pct([1.0, 2.0, 3.0, 4.0], 50)
2.5
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pct(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``xs`` (NaN for no samples)."""
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), load-independent cost."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
