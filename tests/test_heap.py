"""The start-up heap leaves the cyclic GC's view once a service is ready (reward_router.heap).

Each check runs in a fresh interpreter: freezing is once per process, and this test process
may already have frozen for a service another test started."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.split()


def test_freezing_moves_the_live_heap_out_of_collection_once_per_process() -> None:
    first, count, second, after = _run(
        """
        import gc
        from reward_router.heap import freeze_startup_heap
        keep = [[i] for i in range(10_000)]
        first = freeze_startup_heap()
        count = gc.get_freeze_count()
        more = [[i] for i in range(10_000)]
        print(first, count, freeze_startup_heap(), gc.get_freeze_count())
        """
    )
    assert first == "True" and second == "False"
    assert int(count) > 10_000  # the 10,000 lists kept alive, and the interpreter's own objects
    assert int(after) == int(count)  # the second call froze nothing more


def test_an_rm_service_freezes_its_heap_when_its_model_has_loaded() -> None:
    before, after, ready = _run(
        """
        import asyncio, gc
        from services.backends import make_backend
        from services.serving import RMServing
        from services.settings import ServiceSettings

        async def main():
            settings = ServiceSettings(name="len", backend="length")
            rm = RMServing(settings, make_backend(settings))
            before = gc.get_freeze_count()
            await rm.load()
            print(before, gc.get_freeze_count(), rm.ready)
            await rm.close()

        asyncio.run(main())
        """
    )
    assert int(before) == 0
    assert int(after) > 10_000  # FastAPI, pydantic, numpy: all frozen
    assert ready == "True"
