"""A stand-in for ``vllm serve --runner pooling`` speaking vLLM's /classify schema (fast tests).

Only the boundary is faked (the real server is checked in tests/services/test_vllm_e2e.py).
It takes text or token ids (decoded with ``--tokenizer``) and its "model" scores the text as
``count("good") - count("bad") + 0.5``; with ``use_activation`` left on (vLLM's default) it
returns the sigmoid of that, so a test can tell raw rewards from squashed ones. An input
containing ``explode`` makes it answer 500, like a server-side failure; one over
``--max-model-len`` tokens gets vLLM's 400. ``/v1/models`` lists ``max_model_len`` as vLLM does.

    python -m tests.services.fake_vllm --port 8200 --tokenizer DIR
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
    input: list[int] | list[list[int]] | str | list[str]
    use_activation: bool | None = None
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool = True


def raw_reward(text: str) -> float:
    return text.count("good") - text.count("bad") + 0.5


def build(
    tokenizer: str | None = None, max_model_len: int = 4096, classify_route: bool = True
) -> FastAPI:
    app = FastAPI()
    seen: list[dict[str, object]] = []
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)

    @app.get("/v1/models")
    def models() -> dict[str, object]:
        card = {"id": MODEL, "object": "model", "max_model_len": max_model_len}
        return {"object": "list", "data": [card]}

    # vLLM registers /classify only for models whose pooling task is classify (a per-token
    # `token_classify` reward model has /pooling only): --no-classify is such a server.
    @app.post("/classify", include_in_schema=classify_route)
    def classify(req: ClassifyRequest) -> JSONResponse:
        if not classify_route:
            return JSONResponse({"detail": "Not Found"}, 404)
        raw = req.input
        batch = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        ids = isinstance(batch[0], list) if batch else False
        seen.append({"n": len(batch), "use_activation": req.use_activation, "ids": ids})
        if req.model not in (None, MODEL):
            return JSONResponse({"error": {"message": f"model {req.model} not found"}}, 404)
        if ids and tok is None:
            return JSONResponse({"error": {"message": "started without --tokenizer"}}, 400)
        if ids and max(len(x) for x in batch) > max_model_len:  # type: ignore[arg-type]
            msg = f"This model's maximum context length is {max_model_len} tokens."
            return JSONResponse({"error": {"message": msg, "type": "BadRequestError"}}, 400)
        texts = [tok.decode(x) if ids and tok is not None else str(x) for x in batch]
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
    parser.add_argument("--tokenizer")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--no-classify", action="store_true")
    args = parser.parse_args()
    app = build(args.tokenizer, args.max_model_len, classify_route=not args.no_classify)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
