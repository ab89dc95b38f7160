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


def test_an_rm_service_leaves_no_cyclic_garbage_per_request() -> None:
    """What requests leave in reference cycles, only a full collection frees. A real uvicorn
    server on loopback, 50 compare requests with the collector off (over the benchmarks' raw
    keep-alive connection: an HTTP client's own cycles would count too), then one collection.
    Starlette's ``BaseHTTPMiddleware`` (the metering middleware before) left ~40 objects per
    request: a cancelled scope's ``CancelledError``, its traceback and frames."""
    (found,) = _run(
        """
        import asyncio, gc, json
        import uvicorn
        from benchmarks.common import RawHTTP
        from services.app import create_app
        from services.settings import ServiceSettings
        from tests.procs import free_port

        async def main():
            port = free_port()
            app = create_app(ServiceSettings(name="len", backend="length"))
            config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
            server = uvicorn.Server(config)
            serving = asyncio.create_task(server.serve())
            while not (server.started and app.state.rm.ready):
                await asyncio.sleep(0.05)
            pair = {"prompt": "Say hi.", "response_a": "Hi there!", "response_b": "No."}
            body = json.dumps({"pairs": [pair]}).encode()
            conn = RawHTTP("127.0.0.1", port)
            for _ in range(5):  # warm: first-request caches are not garbage
                assert (await conn.post("/v1/compare", body))[0] == 200
            gc.collect()
            gc.disable()
            for _ in range(50):
                assert (await conn.post("/v1/compare", body))[0] == 200
            found = gc.collect()
            await conn.close()
            server.should_exit = True
            await serving
            print(found)

        asyncio.run(main())
        """
    )
    assert int(found) < 50, f"{found} objects in reference cycles after 50 requests"
