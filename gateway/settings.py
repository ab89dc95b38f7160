"""The gateway's one settings object, read once at start-up (YAML file, then env vars on top).

Precedence, highest first: keyword overrides (the CLI's ``--host``/``--port``), environment
variables (``REWARD_ROUTER_GATEWAY_<FIELD>``, nested with ``__``; ``REDIS_URL`` for the store),
the YAML file given to ``reward-router gateway serve --config FILE``, the defaults below.
Environment beats the file so that one file can serve several deployments.

>>> s = GatewaySettings(rms=[{"name": "len", "url": "http://127.0.0.1:9000"}])
>>> (s.host, s.redis_url, s.policy.name)
('127.0.0.1', None, 'bayesian')
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from gateway.routing.registry import NEEDS_PRIOR
from reward_router.errors import ConfigError
from reward_router.exposure import is_loopback, placeholder_secret, redis_password
from reward_router.protocol import NAMESPACE_PATTERN

NAMESPACE_RE = re.compile(NAMESPACE_PATTERN)
#: The namespace ``/get_reward`` (OpenRLHF) uses by default; created at start-up to learn from
#: correctness (the gateway's own audits of OpenRLHF's labels), not from −DPO loss.
OPENRLHF_NAMESPACE = "openrlhf"
"""Namespace names: no ':' (route ids are ``ns:gen:uuid``) and no braces (Redis hash tags)."""


class RMEndpoint(BaseModel):
    """One RM scoring service (issue 3's ``/v1/compare`` API).

    The timeouts are explicit because a stuck RM must not hold a trainer's batch: connect
    fails fast (a dead process answers "refused" at once), read allows a real model's batch.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    url: str = Field(min_length=1)
    connect_timeout_s: float = Field(default=1.0, gt=0, le=60)
    read_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    max_batch: int = Field(default=64, ge=1, le=4096)
    # An RM that can only abstain without the pair's reference (the rule-based verifier): pairs
    # without one go to it only when every other RM has failed.
    needs_reference: bool = False
    # The RM service's own ``api_key`` (services/settings.py), sent as a bearer header on every
    # call; None = the service is open. Shown as "configured" in ``safe_dict``, never logged.
    api_key: SecretStr | None = None


class PolicyDefaults(BaseModel):
    """The policy a new namespace gets unless its creator asks for another.

    ``params`` go to ``gateway.routing.make_policy`` (validated there, e.g. ``lambda0``,
    ``sigma2``); ``normalizer`` is how the trainer's raw reward (−DPO loss) is normalised
    before the posterior update.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "bayesian"
    params: dict[str, Any] = Field(default_factory=dict)
    normalizer: Literal["quantile", "zscore", "none"] = "quantile"
    normalizer_params: dict[str, Any] = Field(default_factory=dict)
    best_rm: str | None = None
    # What the trainer's reward is: "dpo" (−DPO loss: normalised, then mapped onto P(label
    # right) by the link) or "correct" (already P(label right)); None = by the normaliser
    # ("correct" with normalizer none, else "dpo"). See gateway.routing.prior.RewardLink.
    reward: Literal["dpo", "correct"] | None = None
    # How much a quantile of −DPO loss says about the label's correctness (the link's beta):
    # E[u | correct] - E[u | wrong]. A stated assumption, docs/routing-core.md.
    dpo_informativeness: float = Field(default=0.1, gt=0, le=1)
    # Average RM calls per pair allowed: above 1, a pair whose RM tied is asked of the next RM
    # of the same draw while the namespace's budget lasts.
    max_calls_per_pair: float = Field(default=1.0, ge=1, le=2)


class GatewaySettings(BaseSettings):
    """Everything the gateway reads at start-up; see docs/gateway.md for each field's role."""

    model_config = SettingsConfigDict(
        env_prefix="REWARD_ROUTER_GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        yaml_file=None,
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    # Longer than a client pool's idle expiry (httpx: 5 s), so the server never closes a
    # keep-alive connection a client is just reusing (that shows up as a client ReadError).
    keep_alive_s: float = Field(default=30.0, gt=0, le=3600)

    rms: list[RMEndpoint] = Field(default_factory=list, validate_default=True)
    router_path: Path | None = None
    encoder_batch_size: int = Field(default=32, ge=1, le=1024)
    # "cuda" puts the pair encoder on a GPU: on CPU a MiniLM encode of a 256-token pair costs
    # ~100+ ms, which caps a replica at a few pairs/s per core (benchmarks/bench_gateway.py).
    encoder_device: str = "cpu"
    # "onnx-int8": the same encoder exported to ONNX Runtime with int8 weights, ~3.4x less CPU
    # per pair at replay accuracy within 0.001 (CPU only, mean-pooling encoders such as MiniLM;
    # needs the `onnx` extra; exported once into the model cache). "torch": any encoder.
    encoder_backend: Literal["torch", "onnx-int8"] = "torch"
    feature_cache_dir: Path | None = None
    torch_threads: int = Field(default=1, ge=1, le=256)

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "REWARD_ROUTER_GATEWAY_REDIS_URL", "redis_url"),
    )
    # The Redis topology (docs/operations.md#redis-topologies): redis_url alone is one server;
    # with redis_cluster it names one node of a Redis Cluster (the others are discovered);
    # redis_sentinels (instead of redis_url) are the Sentinels to ask for the current master of
    # redis_sentinel_master, found again after a failover.
    redis_cluster: bool = False
    # "host:port" each; in the environment one comma-separated string
    # (REWARD_ROUTER_GATEWAY_REDIS_SENTINELS=s1:26379,s2:26379,s3:26379).
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str | None = Field(default=None, min_length=1, max_length=128)
    # The Sentinels' own credentials (their requirepass / ACL user), None = open Sentinels.
    redis_sentinel_username: str | None = None
    redis_sentinel_password: SecretStr | None = None
    # The master's credentials and database with Sentinel (with redis_url they are in the URL).
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_db: int = Field(default=0, ge=0, le=10_000)
    # Connections per gateway replica (per node on a cluster). A call that finds them all in
    # use waits up to redis_pool_timeout_s for one (then 503 store_unavailable), so a burst
    # queues instead of failing; max_in_flight (256) requests hold at most one each at a time.
    redis_pool_size: int = Field(default=128, ge=1, le=10_000)
    redis_pool_timeout_s: float = Field(default=10.0, gt=0, le=600)
    key_prefix: str = Field(default="rr", pattern=r"^[A-Za-z0-9_.\-]{1,32}$")
    # Redis reconnect: a restart of redis-server takes ~1 s; 8 exponential tries cap ~6 s total.
    store_retries: int = Field(default=8, ge=0, le=100)
    store_timeout_s: float = Field(default=5.0, gt=0, le=120)
    # Without redis_url: the SQLite file of the persistent embedded store (one replica). None =
    # memory only, lost on every restart (warned about at start-up, in /readyz and a metric).
    store_path: Path | None = None
    # "full": each commit fsyncs (an acknowledged feedback survives power loss); "normal":
    # survives a killed process, the last commits may be lost on power loss (docs/reliability.md).
    store_synchronous: Literal["full", "normal"] = "full"

    route_ttl_s: float = Field(default=86400.0, gt=0, le=30 * 86400)
    refresh_interval_ms: float = Field(default=0.0, ge=0, le=600_000)
    # Every this many observations a replica stores its folded state, so a restart reads the
    # snapshot plus the log after it, not the whole log (0 = never).
    snapshot_every: int = Field(default=1000, ge=0)
    # Most log entries one store read returns: a long log is read (and folded) in chunks.
    log_read_chunk: int = Field(default=4096, ge=1, le=1_000_000)
    # Log compaction: after writing a snapshot at seq s, the replica trims the log's entries
    # seq <= s - log_keep (kept: replicas up to log_keep behind catch up from the log, others
    # reload the snapshot). None = never trim (the whole log stays, for audits and rebuilds).
    log_keep: int | None = Field(default=None, ge=0)
    # Namespaces the store may hold (POST /v1/namespaces past it: 409); each costs memory in
    # every replica (142-413 KiB at dim 64) and keys in Redis.
    max_namespaces: int = Field(default=1000, ge=1, le=1_000_000)

    api_keys: list[SecretStr] = Field(default_factory=list)
    admin_key: SecretStr | None = None
    # The key of every RM service whose ``rms[]`` entry names none (one env var for a cluster
    # whose RMs share a key: REWARD_ROUTER_GATEWAY_RM_API_KEY).
    rm_api_key: SecretStr | None = None
    # A host other than loopback with no api_keys is refused at start-up (anyone reaching it
    # could route and send feedback); true serves it open on purpose, and says so in the log.
    allow_unauthenticated: bool = False

    policy: PolicyDefaults = Field(default_factory=PolicyDefaults)
    # Created with the policy defaults at start-up when missing, for clients that cannot create
    # one (OpenRLHF's /get_reward, quick tries). /v1/route never creates a namespace.
    startup_namespaces: list[str] = Field(default_factory=lambda: ["default", OPENRLHF_NAMESPACE])
    seed: int | None = None

    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_pairs: int = Field(default=1024, ge=1, le=100_000)
    max_text_chars: int = Field(default=200_000, ge=1)
    max_feedback: int = Field(default=10_000, ge=1)
    # Overload (docs/reliability.md#overload): requests served at once; one more is answered
    # 503 + Retry-After at once instead of queueing (health probes and /metrics not counted).
    max_in_flight: int = Field(default=256, ge=1, le=100_000)
    retry_after_s: int = Field(default=1, ge=1, le=3600)
    # Slow clients: the request line + headers, then the body, must arrive within these, else
    # the connection is closed (headers) or answered 408 (body). Abandoned requests (client
    # disconnected) are cancelled, their RM calls with them.
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)

    health_interval_s: float = Field(default=2.0, gt=0, le=3600)
    failure_threshold: int = Field(default=3, ge=1, le=1000)
    cooldown_s: float = Field(default=10.0, ge=0, le=3600)

    max_metric_namespaces: int = Field(default=32, ge=1, le=1000)

    @model_validator(mode="after")
    def _prior_needs_a_router(self) -> GatewaySettings:
        # Caught at start-up, not as a 422 on every /v1/route of every new namespace.
        if self.policy.name in NEEDS_PRIOR and self.router_path is None:
            raise ValueError(
                f"policy.name: {self.policy.name!r} needs the offline router's prior: set "
                "router_path, or use 'bayesian-no-offline' to route on the intercept alone"
            )
        return self

    @field_validator("startup_namespaces")
    @classmethod
    def _namespace_names(cls, names: list[str]) -> list[str]:
        for n in names:
            if not NAMESPACE_RE.match(n):
                raise ValueError(f"{n!r} must match {NAMESPACE_RE.pattern}")
        return names

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinel_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, v: list[str]) -> list[str]:
        for i, addr in enumerate(v):
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"item {i}: {addr!r} is not host:port (e.g. 10.0.0.5:26379)")
        return v

    @model_validator(mode="after")
    def _redis_topology(self) -> GatewaySettings:
        url = self.redis_url
        scheme = url.partition("://")[0].lower() if url and "://" in url else None
        if url is not None and scheme not in ("redis", "rediss", "unix"):
            hint = ""
            if scheme is not None and "sentinel" in scheme:
                hint = (
                    ": redis-py takes no Sentinel URL; leave redis_url (REDIS_URL) unset and set "
                    "redis_sentinels (host:port,...) and redis_sentinel_master instead, the "
                    "master's password in redis_password"
                )
            raise ValueError(
                f"redis_url: must start with redis://, rediss:// or unix://, got "
                f"{scheme + '://' if scheme else 'no scheme'}{hint}"
            )
        if self.redis_sentinels:
            if url is not None:
                raise ValueError(
                    "redis_url: set either redis_url (one server or a cluster node) or "
                    "redis_sentinels (the master found through Sentinel), not both"
                )
            if self.redis_cluster:
                raise ValueError("redis_cluster: a Redis Cluster has no Sentinels; unset one")
            if self.redis_sentinel_master is None:
                raise ValueError(
                    "redis_sentinel_master: the name the Sentinels monitor the master under "
                    "(`sentinel monitor NAME ...`) is required with redis_sentinels"
                )
            return self
        only_sentinel = (
            "redis_sentinel_master",
            "redis_sentinel_password",
            "redis_sentinel_username",
            "redis_username",
        )
        for name in only_sentinel:
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: only used with redis_sentinels, which is empty")
        if self.redis_password is not None or self.redis_db:
            field = "redis_password" if self.redis_password is not None else "redis_db"
            raise ValueError(
                f"{field}: only used with redis_sentinels; put the password and database in "
                "redis_url (redis://:PASSWORD@host:6379/0)"
            )
        if self.redis_cluster:
            if url is None:
                raise ValueError("redis_cluster: set redis_url to one node of the cluster")
            path = url.partition("://")[2].partition("/")[2].partition("?")[0]
            if scheme == "unix" or path not in ("", "0"):
                raise ValueError(
                    "redis_url: a Redis Cluster is reached over TCP and has database 0 only, "
                    f"got {re.sub(r'//[^@/]*@', '//***@', url)!r}"
                )
        return self

    @property
    def uses_redis(self) -> bool:
        """Whether the store is Redis (shared by replicas): by URL or through Sentinel."""
        return self.redis_url is not None or bool(self.redis_sentinels)

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``redis_sentinels`` as (host, port) pairs (IPv6 hosts may be in brackets)."""
        out = []
        for addr in self.redis_sentinels:
            host, _, port = addr.rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out

    @model_validator(mode="after")
    def _safe_by_default(self) -> GatewaySettings:
        # Every secret: refuse a known placeholder (a default key is worse than no key).
        named: list[tuple[str, SecretStr | str | None]] = [
            *((f"api_keys.{i}", k) for i, k in enumerate(self.api_keys)),
            ("admin_key", self.admin_key),
            ("rm_api_key", self.rm_api_key),
            *((f"rms.{i}.api_key", rm.api_key) for i, rm in enumerate(self.rms)),
            ("redis_url", redis_password(self.redis_url) if self.redis_url else None),
            ("redis_password", self.redis_password),
            ("redis_sentinel_password", self.redis_sentinel_password),
        ]
        for field, secret in named:
            raw = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
            if raw is not None and placeholder_secret(raw):
                raise ValueError(
                    f"{field}: a known placeholder ('change-me', 'changethis', 'password', ...) "
                    "is not a secret: set a real one, e.g. the output of "
                    "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
                )
        if not self.api_keys and not is_loopback(self.host) and not self.allow_unauthenticated:
            raise ValueError(
                f"host: {self.host!r} is reachable from other machines and api_keys is empty: "
                "set api_keys (REWARD_ROUTER_GATEWAY_API_KEYS), bind 127.0.0.1, or set "
                "allow_unauthenticated: true to serve it without keys on purpose"
            )
        for rm in self.rms:
            if rm.api_key is None:
                rm.api_key = self.rm_api_key
        return self

    def startup_warnings(self) -> list[str]:
        """What the gateway logs at start-up about its exposure (empty when nothing is open)."""
        if self.api_keys or is_loopback(self.host):
            return []
        return [
            f"serving on {self.host}:{self.port} without api_keys (allow_unauthenticated is "
            "set): anyone who reaches this address can route pairs and send feedback"
        ]

    @field_validator("rms")
    @classmethod
    def _unique_rm_names(cls, rms: list[RMEndpoint]) -> list[RMEndpoint]:
        if not rms:
            raise ValueError("at least one RM endpoint is required")
        names = [r.name for r in rms]
        if len(set(names)) != len(names):
            raise ValueError(f"RM names must be unique, got {names}")
        return rms

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    def safe_dict(self) -> dict[str, Any]:
        """The settings without secrets, for logs and ``/v1/info``."""
        d = self.model_dump(
            mode="json",
            exclude={
                "api_keys",
                "admin_key",
                "rm_api_key",
                "redis_password",
                "redis_sentinel_password",
            },
        )
        d["api_keys"] = f"{len(self.api_keys)} configured"
        d["admin_key"] = "configured" if self.admin_key else None
        d["rm_api_key"] = "configured" if self.rm_api_key else None
        d["redis_password"] = "configured" if self.redis_password else None
        d["redis_sentinel_password"] = "configured" if self.redis_sentinel_password else None
        if self.redis_url:
            d["redis_url"] = re.sub(r"//[^@/]*@", "//***@", self.redis_url)
        for rm, out in zip(self.rms, d["rms"], strict=True):
            out["api_key"] = "configured" if rm.api_key else None
        return d


def load_settings(config: Path | str | None = None, **overrides: Any) -> GatewaySettings:
    """Read the settings once; any bad value raises :class:`ConfigError` naming the field.

    >>> load_settings(None, rms=[{"name": "x", "url": "http://h"}], port=0)
    Traceback (most recent call last):
    ...
    reward_router.errors.ConfigError: port: Input should be greater than or equal to 1
    """
    cls: type[GatewaySettings] = GatewaySettings
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError("config", f"no such file: {path}")

        class _FromFile(GatewaySettings):
            model_config = SettingsConfigDict(yaml_file=str(path))

        cls = _FromFile
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError.from_validation(exc, "settings") from None
