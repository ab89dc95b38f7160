"""``vllm``: a client of a running ``vllm serve`` pooling server (``/classify``).

vLLM serves one-label sequence-classification reward models (Skywork-Reward, InternLM2-reward,
...) with ``vllm serve MODEL --runner pooling``. Its ``POST /classify`` takes
``{"model", "input": [str, ...], "use_activation", "truncate_prompt_tokens"}`` and answers
``{"data": [{"index", "label", "probs": [float, ...], "num_classes"}], ...}``. With
``use_activation: false`` the ``probs`` of a one-label model are the raw reward logits, which is
what a reward is (the default sigmoid would squash the margins the router learns from).

Prompts are rendered here, so a whole micro-batch goes in one request: with ``tokenizer`` set
(a local folder with the RM's chat template) the conversation is rendered by that template and
lengths are checked locally (truncation reported per item); without it the prompt and response
are joined as plain text and vLLM's ``truncate_prompt_tokens`` (which keeps the last tokens)
enforces ``max_length``, unreported.

Needs no extra Python package (plain HTTP); ``pip install reward-router[vllm]`` is the place for
the server side. Tested against a stand-in server that speaks this schema.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx

from reward_router.data import Message, prompt_text
from reward_router.errors import ConfigError
from services.backends.base import Backend, Scored, ScoreInput
from services.errors import UpstreamError

# Transport failures (connection refused/reset) are retried: /classify is a pure read, so a
# retry cannot double-apply anything; 3 tries over ~0.6 s ride out a server restart's blip
# without holding the batch long. HTTP error answers are not retried: they would repeat.
RETRIES = 3
BACKOFF_S = 0.2


def render_plain(prompt: list[Message], response: str) -> str:
    """The text sent when no tokenizer is configured.

    >>> render_plain([{"role": "user", "content": "2+2?"}], "4")
    'User: 2+2?\\n\\nAssistant: 4'
    """
    return f"User: {prompt_text(prompt)}\n\nAssistant: {response}"


class VLLMBackend(Backend):
    kind = "vllm"

    @property
    def model_ref(self) -> str:
        served = getattr(self, "served_model", None)
        return served or self.settings.vllm_model or self.settings.model or "vllm"

    def load(self) -> None:
        s = self.settings
        self.url = str(s.vllm_url).rstrip("/")
        self.client = httpx.Client(timeout=s.vllm_timeout_s)
        self.tokenizer: Any = None
        if s.tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(
                s.tokenizer, trust_remote_code=s.trust_remote_code
            )
        try:
            models = self._request("GET", "/v1/models").get("data") or []
        except UpstreamError as exc:
            raise ConfigError("vllm_url", exc.message) from exc
        served = [m.get("id") for m in models if isinstance(m, dict)]
        if s.vllm_model is None:
            if not served:
                raise ConfigError("vllm_model", f"{self.url} serves no model")
            self.served_model = str(served[0])
        elif s.vllm_model not in served:
            raise ConfigError("vllm_model", f"{s.vllm_model!r} not served by {self.url}: {served}")
        else:
            self.served_model = s.vllm_model

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        rm = self.settings.name
        for attempt in range(RETRIES):
            try:
                r = self.client.request(method, self.url + path, json=body)
                break
            except httpx.TransportError as exc:
                if attempt == RETRIES - 1:
                    raise UpstreamError(
                        f"vLLM server {self.url} unreachable: {exc}", rm=rm
                    ) from exc
                time.sleep(BACKOFF_S * (attempt + 1))
        if r.status_code != 200:
            raise UpstreamError(f"vLLM {path} answered {r.status_code}: {r.text[:300]}", rm=rm)
        try:
            return r.json()
        except ValueError as exc:
            raise UpstreamError(f"vLLM {path} answered non-JSON", rm=rm) from exc

    def _render(self, item: ScoreInput) -> str:
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            conv = [*item.prompt, {"role": "assistant", "content": item.response}]
            return str(self.tokenizer.apply_chat_template(conv, tokenize=False))
        return render_plain(item.prompt, item.response)

    def score_batch(self, items: Sequence[ScoreInput]) -> list[Scored]:
        s = self.settings
        texts = [self._render(i) for i in items]
        cut = [False] * len(items)
        if self.tokenizer is not None:
            lengths = [len(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts]
            cut = [n > s.max_length for n in lengths]
        send = [k for k in range(len(items)) if not (cut[k] and s.truncation == "error")]
        out: list[Scored] = [Scored(float("nan"), too_long=True)] * len(items)
        if not send:
            return out
        body = {
            "model": self.served_model,
            "input": [texts[k] for k in send],
            "use_activation": False,
            "truncate_prompt_tokens": s.max_length,
        }
        data = self._request("POST", "/classify", body).get("data")
        if not isinstance(data, list) or len(data) != len(send):
            raise UpstreamError(
                f"vLLM /classify returned {len(data) if isinstance(data, list) else 'no'} "
                f"results for {len(send)} inputs",
                rm=s.name,
            )
        for row in data:
            probs = row.get("probs") if isinstance(row, dict) else None
            index = row.get("index") if isinstance(row, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(send) or not probs:
                raise UpstreamError(f"vLLM /classify result out of schema: {row!r:.200}", rm=s.name)
            k = send[index]
            out[k] = Scored(float(probs[0]), truncated=cut[k])
        return out
