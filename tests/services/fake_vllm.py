"""A stand-in for ``vllm serve --runner pooling`` speaking vLLM's documented /classify schema.

Only the boundary is faked (a remote vLLM server is outside the project). Its "model" scores a
text as ``count("good") - count("bad") + 0.5``; with ``use_activation`` left on (vLLM's
default) it returns the sigmoid of that, so a test can tell raw rewards from squashed ones.
An input containing ``explode`` makes it answer 500, like a server-side failure.

    python -m tests.services.fake_vllm --port 8200
"""

from __future__ import annotations

import argparse
import math
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

MODEL = "fake/Skywork-Reward-Tiny"


class ClassifyRequest(BaseModel):
    model: str | None = None
    input: str | list[str]
    use_activation: bool | None = None
    truncate_prompt_tokens: int | None = None


def raw_reward(text: str) -> float:
    return text.count("good") - text.count("bad") + 0.5


def build() -> FastAPI:
    app = FastAPI()
    seen: list[dict[str, object]] = []

    @app.get("/v1/models")
    def models() -> dict[str, object]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/classify")
    def classify(req: ClassifyRequest) -> JSONResponse:
        texts = [req.input] if isinstance(req.input, str) else req.input
        seen.append({"n": len(texts), "use_activation": req.use_activation})
        if req.model not in (None, MODEL):
            return JSONResponse({"error": {"message": f"model {req.model} not found"}}, 404)
        if any("explode" in t for t in texts):
            return JSONResponse({"error": {"message": "engine died"}}, 500)
        data = []
        for i, t in enumerate(texts):
            raw = raw_reward(t)
            value = raw if req.use_activation is False else 1.0 / (1.0 + math.exp(-raw))
            data.append({"index": i, "label": "LABEL_0", "probs": [value], "num_classes": 1})
        data.reverse()  # results are matched by "index", not by position
        return JSONResponse(
            {
                "id": "classify-test",
                "object": "list",
                "created": int(time.time()),
                "model": MODEL,
                "data": data,
                "usage": {"prompt_tokens": sum(len(t.split()) for t in texts)},
            }
        )

    @app.get("/seen")
    def seen_requests() -> list[dict[str, object]]:
        return seen

    return app


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(build(), host="127.0.0.1", port=args.port, log_level="warning")
