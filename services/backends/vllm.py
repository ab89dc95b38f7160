"""``vllm``: a client of a running ``vllm serve MODEL --runner pooling`` server (``/classify``).

Which models have ``/classify``: vLLM serves ``POST /classify`` for models whose pooling task is
``classify``, i.e. sequence-classification architectures (``LlamaForSequenceClassification``,
``Qwen2ForSequenceClassification``, ... : Skywork-Reward-V2 and other one-label RMs of that
form). Per-token reward models (InternLM2-reward, ``Qwen2ForRewardModel`` such as
Qwen2.5-Math-RM) are ``token_classify`` models in vLLM: they have no ``/classify`` route, only
``/pooling`` (their per-token scores, a different schema), and this backend refuses them at
start with an error saying so.

Items are scored as the ``hf`` backend scores them: the RM's own tokenizer (``tokenizer``;
default: the served model's name, which is its folder or hub id) renders and tokenises each
item here with the same code (:func:`services.backends.hf.encode_ids`: the chat template,
which writes its own BOS, without adding special tokens again; the end of the response kept
when an item is longer than ``max_length``, and the item reported ``truncated``). vLLM gets
the token ids, so its own tokenisation, truncation side and ``add_special_tokens`` never
apply. A micro-batch is one ``POST /classify`` with ``{"model", "input": [[ids], ...],
"use_activation": false}``; with ``use_activation: false`` the ``probs`` of a one-label model
are the raw reward logits, which is what a reward is (the default sigmoid would squash the
margins the router learns from).

At start the backend reads the served model and its ``max_model_len`` from ``/v1/models`` and
refuses a ``max_length`` above it (vLLM would answer every longer call 400), then asks
``/classify`` once to check that the route exists and the model has one label. With
``vllm_api_key`` set (the server's ``--api-key``), every call sends it as a Bearer token.

Needs no Python package beyond the service's (plain HTTP and the tokenizer): vLLM runs as its
own server, in its own container (``vllm/vllm-openai``, pinned in docker-compose.yml).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx

from reward_router.errors import ConfigError
from services.backends.base import Backend, Scored, ScoreInput
from services.backends.hf import encode_ids
from services.errors import UpstreamError

# Transport failures (connection refused/reset) are retried: /classify is a pure read, so a
# retry cannot double-apply anything; 3 tries over ~0.6 s ride out a server restart's blip
# without holding the batch long. HTTP error answers are not retried: they would repeat.
RETRIES = 3
BACKOFF_S = 0.2


class VLLMBackend(Backend):
    kind = "vllm"

    @property
    def model_ref(self) -> str:
        served = getattr(self, "served_model", None)
        return served or self.settings.vllm_model or self.settings.model or "vllm"

    def load(self) -> None:
        s = self.settings
        self.url = str(s.vllm_url).rstrip("/")
        headers = {}
        if s.vllm_api_key is not None:
            headers["Authorization"] = f"Bearer {s.vllm_api_key.get_secret_value()}"
        self.client = httpx.Client(timeout=s.vllm_timeout_s, headers=headers)
        try:
            models = self._request("GET", "/v1/models").get("data") or []
        except UpstreamError as exc:
            if " 401" in exc.message:
                raise ConfigError(
                    "vllm_api_key",
                    f"{exc.message}: set vllm_api_key (RR_RM_VLLM_API_KEY) to the server's "
                    "--api-key",
                ) from exc
            raise ConfigError("vllm_url", exc.message) from exc
        cards = {str(m.get("id")): m for m in models if isinstance(m, dict)}
        if s.vllm_model is None:
            if not cards:
                raise ConfigError("vllm_model", f"{self.url} serves no model")
            self.served_model = next(iter(cards))
        elif s.vllm_model not in cards:
            raise ConfigError(
                "vllm_model", f"{s.vllm_model!r} not served by {self.url}: {list(cards)}"
            )
        else:
            self.served_model = s.vllm_model
        self.max_model_len = self._check_max_length(cards[self.served_model])
        self.tokenizer = self._load_tokenizer()
        self._check_classify()

    def _check_max_length(self, card: dict[str, Any]) -> int:
        s = self.settings
        limit = card.get("max_model_len")
        if not isinstance(limit, int) or limit <= 0:
            raise ConfigError(
                "vllm_url",
                f"{self.url} /v1/models gives no max_model_len for {self.served_model!r}: "
                "not a vLLM server?",
            )
        if s.max_length > limit:
            raise ConfigError(
                "max_length",
                f"{s.max_length} exceeds the max_model_len {limit} of {self.served_model!r} on "
                f"{self.url}: every longer input would fail there; set max_length <= {limit} "
                "or start vLLM with a larger --max-model-len",
            )
        return limit

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        s = self.settings
        source = s.tokenizer or self.served_model
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=s.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                "tokenizer",
                f"cannot load the RM's tokenizer from {source!r} ({exc}); the vllm backend "
                "renders and tokenises with it: set tokenizer to the model's folder or hub id",
            ) from exc

    def _check_classify(self) -> None:
        ids, _ = encode_ids(self.tokenizer, [[{"role": "user", "content": "ok"}]], ["ok"], 16)
        body = {"model": self.served_model, "input": ids, "use_activation": False}
        try:
            data = self._request("POST", "/classify", body).get("data") or [{}]
        except UpstreamError as exc:
            if " 404" in exc.message or " 405" in exc.message:
                raise ConfigError(
                    "vllm_model",
                    f"{self.url} has no /classify for {self.served_model!r}: vLLM serves it only "
                    "for sequence-classification models (per-token reward models such as "
                    "InternLM2-reward or Qwen2ForRewardModel are token_classify, /pooling "
                    "only, which this backend does not speak)",
                ) from exc
            raise ConfigError("vllm_url", exc.message) from exc
        labels = data[0].get("num_classes") if isinstance(data[0], dict) else None
        if labels != 1:
            raise ConfigError(
                "vllm_model",
                f"{self.served_model!r} answers {labels} classes; a reward model has one label",
            )

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

    def score_batch(self, items: Sequence[ScoreInput]) -> list[Scored]:
        s = self.settings
        ids, cut = encode_ids(
            self.tokenizer, [i.prompt for i in items], [i.response for i in items], s.max_length
        )
        send = [k for k in range(len(items)) if not (cut[k] and s.truncation == "error")]
        out: list[Scored] = [Scored(float("nan"), too_long=True)] * len(items)
        if not send:
            return out
        # Token ids: vLLM neither re-tokenises nor adds special tokens to them, and they are
        # already cut to max_length <= max_model_len (checked at start).
        body = {
            "model": self.served_model,
            "input": [ids[k] for k in send],
            "use_activation": False,
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
