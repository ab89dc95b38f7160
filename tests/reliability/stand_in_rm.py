"""A stand-in for an external reward model that can be told to misbehave (for the fault tests).

It speaks the RM service protocol the gateway uses (``POST /v1/compare``, ``GET /readyz``) and
prefers the shorter response. ``POST /mode`` switches it, while it runs, to:

* ``ok``       answers correctly;
* ``slow``     answers correctly after ``delay_s`` (longer than the gateway's read timeout);
* ``garbage``  answers 200 with a body that is not a valid compare answer, cycling through
  not-JSON, a missing ``results``, too few results, a NaN score and an unknown label.

``/readyz`` stays 200 in every mode: the hard case is an RM whose health check passes while its
answers are useless. ``GET /stats`` counts the compare calls and pairs it received per mode.
It is a stand-in for something outside the project, so it is a plain stdlib HTTP server.

    python -m tests.reliability.stand_in_rm --port 18110
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GARBAGE = ("not-json", "no-results", "too-few", "nan-score", "bad-label")


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mode = "ok"
        self.delay_s = 5.0
        self.calls: dict[str, int] = {}
        self.pairs: dict[str, int] = {}
        self.garbage = itertools.cycle(GARBAGE)


def _answer(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in pairs:
        a, b = -float(len(p["response_a"])), -float(len(p["response_b"]))
        out.append(
            {"score_a": a, "score_b": b, "preferred": "a" if a > b else "b" if b > a else "tie"}
        )
    return out


def _garbage_body(kind: str, pairs: list[dict[str, Any]]) -> bytes:
    good = _answer(pairs)
    if kind == "not-json":
        return b"<html>upstream hiccup</html>"
    if kind == "no-results":
        return json.dumps({"model": "stand-in"}).encode()
    if kind == "too-few":
        return json.dumps({"model": "stand-in", "results": good[:-1]}).encode()
    if kind == "nan-score":
        bad = [{**r, "score_a": float("nan")} for r in good]
        return json.dumps({"model": "stand-in", "results": bad}).encode()  # NaN: not JSON proper
    bad = [{**r, "preferred": "maybe"} for r in good]
    return json.dumps({"model": "stand-in", "results": bad}).encode()


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            return

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            try:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the gateway gave up waiting (slow mode)

        def _body(self) -> Any:
            n = int(self.headers.get("content-length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def do_GET(self) -> None:
            if self.path in ("/readyz", "/healthz"):
                self._send(200, b'{"status": "ready"}')
            elif self.path == "/stats":
                with state.lock:
                    body = {"mode": state.mode, "calls": state.calls, "pairs": state.pairs}
                self._send(200, json.dumps(body).encode())
            else:
                self._send(404, b'{"detail": "not found"}')

        def do_POST(self) -> None:
            body = self._body()
            if self.path == "/mode":
                with state.lock:
                    state.mode = str(body["mode"])
                    state.delay_s = float(body.get("delay_s", state.delay_s))
                self._send(200, json.dumps({"mode": state.mode}).encode())
                return
            if self.path != "/v1/compare":
                self._send(404, b'{"detail": "not found"}')
                return
            pairs = body["pairs"]
            with state.lock:
                mode, delay = state.mode, state.delay_s
                state.calls[mode] = state.calls.get(mode, 0) + 1
                state.pairs[mode] = state.pairs.get(mode, 0) + len(pairs)
                kind = next(state.garbage) if mode == "garbage" else ""
            if mode == "slow":
                time.sleep(delay)
            if mode == "garbage":
                self._send(200, _garbage_body(kind, pairs))
                return
            out = {"model": "stand-in", "results": _answer(pairs)}
            self._send(200, json.dumps(out).encode())

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(State()))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
