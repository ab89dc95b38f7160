"""What a gateway replica is built from, read off its settings: the router artifact and its
encoder, the RM clients (in the router's RM order) and the store.

>>> router, featurizer = load_router(settings)         # doctest: +SKIP
>>> store = make_store(settings)                        # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.rm_client import RMClient
from gateway.settings import GatewaySettings
from gateway.store import Store
from gateway.store_memory import EmbeddedStore
from reward_router.errors import ConfigError, DataFormatError

if TYPE_CHECKING:
    from gateway.offline.model import OfflineRouter


def load_router(settings: GatewaySettings) -> tuple[OfflineRouter | None, Any]:
    """The router artifact of ``router_path`` and its pair featuriser (None, None without one).
    Its RMs must be exactly the configured ones (a :class:`ConfigError` naming ``rms``)."""
    if settings.router_path is None:
        return None, None
    import torch

    from gateway.offline.model import OfflineRouter

    torch.set_num_threads(settings.torch_threads)
    try:
        loaded = OfflineRouter.load(settings.router_path)
    except DataFormatError as exc:
        raise ConfigError(
            "router_path",
            f"{settings.router_path} is not a router artifact ({exc}); train one with "
            "`reward-router router train ... --out DIR` (docs/offline-router.md)",
        ) from None
    rm_order = [r.name for r in settings.rms]
    missing = sorted(set(loaded.rms) - set(rm_order))
    extra = sorted(set(rm_order) - set(loaded.rms))
    if missing or extra:
        raise ConfigError(
            "rms",
            f"must name exactly the router's RMs {loaded.rms}; "
            f"missing {missing}, not in the router {extra}",
        )
    featurizer = loaded.load_featurizer(
        settings.feature_cache_dir,
        device=settings.encoder_device,
        batch_size=settings.encoder_batch_size,
        backend=settings.encoder_backend,
        threads=settings.torch_threads,
    )
    return loaded, featurizer


def rm_clients(settings: GatewaySettings, rm_order: list[str]) -> list[RMClient]:
    """One client per RM service, in ``rm_order`` (the posterior's arm order)."""
    by_name = {r.name: r for r in settings.rms}
    return [
        RMClient(
            name,
            by_name[name].url,
            connect_timeout_s=by_name[name].connect_timeout_s,
            read_timeout_s=by_name[name].read_timeout_s,
            max_batch=by_name[name].max_batch,
            api_key=(k.get_secret_value() if (k := by_name[name].api_key) else None),
            failure_threshold=settings.failure_threshold,
            cooldown_s=settings.cooldown_s,
        )
        for name in rm_order
    ]


def make_store(settings: GatewaySettings) -> Store:
    """Redis (``redis_url`` / ``redis_sentinels``), SQLite (``store_path``) or in memory."""
    if settings.uses_redis:
        from gateway.store_redis import RedisStore

        return RedisStore.from_settings(settings)
    if settings.store_path is not None:
        from gateway.store_sqlite import SqliteStore

        return SqliteStore(settings.store_path, synchronous=settings.store_synchronous)
    return EmbeddedStore()
