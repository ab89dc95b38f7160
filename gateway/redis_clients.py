"""redis-py clients for the three Redis topologies the store runs on, with the retry and
connection-pool policy the gateway needs: one server (``redis_url``), Sentinel
(``redis_sentinels``: the master found again after a failover) and Cluster (``redis_cluster``).

Every client reconnects (``retries`` tries, back-off 50 ms doubling to 1 s) and waits for a free
connection instead of failing (a blocking pool of ``pool_size``), so a burst of requests queues.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

T = TypeVar("T")


class _Retry(Retry):
    """redis-py's retry, except that a refused login is final.

    ``AuthenticationError`` subclasses ``ConnectionError``, so plain ``Retry`` backs off through
    every try (~6 s with the defaults) before the wrong-password message arrives; a health check
    with a 5 s timeout then sees a timeout instead of the reason.
    """

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def retryable(error: Exception) -> bool:
            if isinstance(error, AuthenticationError):
                return False
            return is_retryable(error) if is_retryable is not None else True

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master discovery with the blocking pool's wait for a free connection.

    redis-py's ``SentinelConnectionPool`` extends the failing ``ConnectionPool``; this puts
    ``BlockingConnectionPool`` (``max_connections``, ``timeout``) under it in the MRO.
    """


RETRY_ON = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]


def _retry(retries: int) -> _Retry:
    # 50 ms doubling to 1 s: a restarted redis-server (~1 s) or a Sentinel failover (a few s)
    # is waited out within the default 8 tries (~6 s).
    return _Retry(ExponentialBackoff(cap=1.0, base=0.05), retries)


def _pooled(
    *, retries: int, timeout_s: float, pool_size: int, pool_timeout_s: float
) -> dict[str, Any]:
    """The blocking pool's and each connection's settings, the same on one server and Sentinel."""
    return {
        "max_connections": pool_size,
        "timeout": pool_timeout_s,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": _retry(retries),
        "retry_on_error": RETRY_ON,
        "health_check_interval": 30,
    }


def url_client(
    url: str, *, retries: int, timeout_s: float, pool_size: int, pool_timeout_s: float
) -> aioredis.Redis:
    """One server, with a blocking pool of ``pool_size`` connections (a call waits
    ``pool_timeout_s`` for one)."""
    pool = BlockingConnectionPool.from_url(
        url, **_pooled(retries=retries, timeout_s=timeout_s, pool_size=pool_size,
                       pool_timeout_s=pool_timeout_s)
    )  # fmt: skip
    return aioredis.Redis.from_pool(pool)


def sentinel_client(
    sentinels: Sequence[tuple[str, int]],
    master: str,
    *,
    db: int,
    username: str | None,
    password: str | None,
    sentinel_username: str | None,
    sentinel_password: str | None,
    retries: int,
    timeout_s: float,
    pool_size: int,
    pool_timeout_s: float,
) -> tuple[aioredis.Redis, Sentinel]:
    """The current master of ``master`` as the Sentinels name it, and the Sentinel manager
    (its connections to the Sentinels close with the store)."""
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
    }
    if sentinel_password is not None:
        sentinel_kwargs["password"] = sentinel_password
    if sentinel_username is not None:
        sentinel_kwargs["username"] = sentinel_username
    manager = Sentinel(list(sentinels), sentinel_kwargs=sentinel_kwargs)
    client = manager.master_for(
        master,
        connection_pool_class=_BlockingSentinelPool,
        db=db,
        username=username,
        password=password,
        **_pooled(
            retries=retries, timeout_s=timeout_s, pool_size=pool_size, pool_timeout_s=pool_timeout_s
        ),
    )
    return client, manager


def cluster_client(url: str, *, retries: int, timeout_s: float, pool_size: int) -> RedisCluster:
    """A Redis Cluster, discovered from the node ``url`` names; per-node pools of
    ``pool_size`` plus a few for the client's own topology reads."""
    client = RedisCluster.from_url(
        url,
        max_connections=pool_size + 8,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
        health_check_interval=30,
    )
    return client
