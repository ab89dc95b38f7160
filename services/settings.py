"""The scoring service's one settings object, read once at start-up.

Sources, highest priority first: environment variables ``RR_RM_<FIELD>`` (e.g.
``RR_RM_PORT=8101``), then the YAML file given with ``--config`` (or ``RR_RM_CONFIG``), then the
defaults below. A bad value fails at start-up with a :class:`~reward_router.errors.ConfigError`
naming the field.

>>> s = load_settings(None, name="length-rm", backend="length")
>>> (s.name, s.host, s.max_batch_size)
('length-rm', '127.0.0.1', 32)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from reward_router.errors import ConfigError
from reward_router.exposure import is_loopback, placeholder_secret

BackendName = Literal["hf", "vllm", "judge", "verifier", "length"]
BACKENDS: tuple[str, ...] = ("hf", "vllm", "judge", "verifier", "length")


class ServiceSettings(BaseSettings):
    """Configuration of one RM scoring service (one process per RM)."""

    model_config = SettingsConfigDict(env_prefix="RR_RM_", extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    backend: BackendName
    # A local folder (relative paths in a YAML file are relative to that file), or a named
    # default the backend knows ("smollm2" for the judge).
    model: str | None = None
    device: str = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    max_length: int = Field(default=512, ge=16, le=131072)
    # "left": cut the oldest tokens of the prompt (and, if still too long, of the response) and
    # report it in the response's ``truncated``; "error": answer 422 naming the item instead.
    truncation: Literal["left", "error"] = "left"
    # Most items (score) or pairs (compare) one request may carry.
    max_request_items: int = Field(default=256, ge=1, le=100_000)
    # Request bodies over this are refused (413) before they are read in full. Twice the
    # gateway's default (8 MiB): a request the gateway took fits in one call to this RM, with
    # room for the gateway merging concurrent callers' pairs into one call (a merged call
    # refused with a 4xx is asked again per caller).
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Most sequences in one forward pass; the micro-batcher never exceeds it.
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    # How long the batcher waits for more requests once it holds one (milliseconds).
    batch_wait_ms: float = Field(default=5.0, ge=0.0, le=1000.0)
    microbatch: bool = True
    # A request still unanswered after this is failed with a 504, never left hanging.
    request_timeout_s: float = Field(default=120.0, gt=0.0, le=3600.0)
    # Overload (docs/reliability.md#overload): requests served at once, and items (score) or
    # pairs (compare) waiting for a forward pass; past either a request is answered 503 +
    # Retry-After at once, so memory stays bounded (an unbounded queue of 400 x 1,024-pair
    # compares took this process to 844 MiB RSS).
    max_in_flight: int = Field(default=64, ge=1, le=100_000)
    max_queued_items: int = Field(default=4096, ge=1, le=10_000_000)
    retry_after_s: int = Field(default=1, ge=1, le=3600)
    # Slow clients: headers, then the body, must arrive within these (closed / 408).
    header_timeout_s: float = Field(default=10.0, gt=0.0, le=3600.0)
    body_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    # Two scores at most this far apart are a tie.
    tie_epsilon: float = Field(default=0.0, ge=0.0)
    torch_threads: int | None = Field(default=None, ge=1, le=1024)
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=1, le=65535)
    # vllm backend: the running `vllm serve` server and the model name it serves (default: the
    # first it lists). Its max_model_len must be at least max_length (checked at start).
    vllm_url: str | None = None
    vllm_model: str | None = None
    vllm_timeout_s: float = Field(default=60.0, gt=0.0)
    # The vLLM server's `--api-key`, sent as `Authorization: Bearer` on every call to it (env
    # RR_RM_VLLM_API_KEY; empty = unset). Never logged.
    vllm_api_key: SecretStr | None = None
    # The RM's tokenizer (a local folder or hub id) that renders and tokenises prompts for the
    # vllm backend; default: the served model's name (its folder or hub id on the vLLM side).
    tokenizer: str | None = None
    # verifier backend: the neutral score given when it abstains (no reference / no answer).
    abstain_score: float = 0.5
    # When set, every endpoint but /healthz, /readyz and /metrics needs
    # ``Authorization: Bearer <api_key>`` (env RR_RM_API_KEY; empty = unset). Never logged.
    api_key: SecretStr | None = None
    # Passed to transformers' from_pretrained: a model folder's own Python code (config.json
    # ``auto_map``) runs only when this is true. Off unless the config turns it on.
    trust_remote_code: bool = False
    # A host other than loopback with no api_key is refused at start-up; true serves the RM
    # open on purpose (e.g. behind a network policy), and says so in the log.
    allow_unauthenticated: bool = False

    @field_validator("api_key", "vllm_api_key", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: Any) -> Any:
        # ``RR_RM_API_KEY=`` (e.g. an unset compose variable) means "no key", not the empty key.
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if raw == "" else value

    @model_validator(mode="after")
    def _backend_needs(self) -> ServiceSettings:
        if self.backend == "hf" and not self.model:
            raise ValueError("model: the hf backend needs a model folder")
        if self.backend == "vllm" and not self.vllm_url:
            raise ValueError("vllm_url: the vllm backend needs the URL of a `vllm serve` server")
        return self

    @model_validator(mode="after")
    def _safe_by_default(self) -> ServiceSettings:
        if self.api_key is not None and placeholder_secret(self.api_key.get_secret_value()):
            raise ValueError(
                "api_key: a known placeholder ('change-me', 'changethis', 'password', ...) is "
                "not a secret: set a real one"
            )
        if self.api_key is None and not is_loopback(self.host) and not self.allow_unauthenticated:
            raise ValueError(
                f"host: {self.host!r} is reachable from other machines and api_key is unset: "
                "set api_key (RR_RM_API_KEY), bind 127.0.0.1, or set allow_unauthenticated: "
                "true to serve it without a key on purpose"
            )
        return self

    def startup_warnings(self) -> list[str]:
        """What the service logs at start-up about its exposure (empty when nothing is open)."""
        if self.api_key is not None or is_loopback(self.host):
            return []
        return [
            f"serving on {self.host}:{self.port} without api_key (allow_unauthenticated is "
            "set): anyone who reaches this address can score with this RM"
        ]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: an operator can override one field of a shipped YAML file
        # (e.g. the port of a second replica) without editing it.
        return (env_settings, init_settings)


def _field_of(err: Any) -> str:
    loc = ".".join(str(x) for x in err.get("loc", ()))
    msg = str(err.get("msg", ""))
    # Model-level validators name their field at the start of the message ("model: ...").
    if not loc and ": " in msg:
        head = msg.removeprefix("Value error, ").split(": ", 1)[0]
        if head in ServiceSettings.model_fields:
            return head
    return loc or "settings"


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a service YAML file; relative ``model``/``tokenizer`` paths become absolute."""
    if not path.exists():
        raise ConfigError("config", f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path}: must be a mapping of settings")
    for key in ("model", "tokenizer"):
        value = data.get(key)
        if isinstance(value, str) and (value.startswith("./") or value.startswith("../")):
            data[key] = str((path.parent / value).resolve())
    return data


def load_settings(config: str | Path | None = None, **overrides: Any) -> ServiceSettings:
    """Build the settings from a YAML file, ``RR_RM_*`` variables and explicit overrides.

    Explicit overrides (command-line flags) win over everything.
    """
    path = config or os.environ.get("RR_RM_CONFIG")
    data: dict[str, Any] = read_yaml(Path(path)) if path else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = ServiceSettings(**{**data, **given})
        if given:
            settings = ServiceSettings.model_validate({**settings.model_dump(), **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        field = _field_of(err)
        msg = msg.removeprefix(f"{field}: ")
        raise ConfigError(field, msg) from exc
    return settings
