"""The Redis connection of every long-running part of the farm (API, scheduler, workers).

Every call has a time limit: a Redis that goes away without closing its connections (a
failover to a replica behind the same address, a network partition, a frozen server)
turns a call into a TimeoutError after ``FARM_REDIS_TIMEOUT`` seconds, which every part
already treats as Redis being away, instead of a wait that lasts as long as TCP keeps a
dead connection open. The broker connections get the same limits (``celery_app``).
"""

from __future__ import annotations

import redis

from farm.config import Config


def connect(config: Config) -> redis.Redis:
    """A client for ``config.redis()`` whose calls give up after ``redis_timeout`` s and
    whose connections are checked after 30 s idle."""
    return redis.Redis.from_url(config.redis(), **connection_limits(config))


def connection_limits(config: Config) -> dict[str, object]:
    """redis-py connection options (also kombu transport options) for ``config``."""
    t = config.redis_timeout
    if not t > 0:
        raise ValueError(f"FARM_REDIS_TIMEOUT={t!r}: must be a number of seconds above 0")
    return {
        "socket_timeout": t,
        "socket_connect_timeout": min(t, 5.0),
        "socket_keepalive": True,
        "health_check_interval": 30,
    }
