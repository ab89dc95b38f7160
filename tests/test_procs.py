"""The test harness's private Redis is real, persistent and not the machine's shared one."""

import redis

from tests.procs import Proc


def test_private_redis_is_isolated(redis_url: str, redis_proc: Proc) -> None:
    assert redis_proc.port != 6379
    client = redis.Redis.from_url(redis_url)
    client.set("reward_router:test", "1")
    assert client.get("reward_router:test") == b"1"
    assert client.config_get("appendonly")["appendonly"] == "yes"
