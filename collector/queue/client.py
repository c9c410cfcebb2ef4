"""Redis clients with timeouts, and the start-up check that names the service when it is down."""

from __future__ import annotations

import redis
import redis.asyncio

from collector.errors import ServiceUnavailable
from collector.settings import Settings


def redis_client(settings: Settings) -> redis.Redis:
    """A blocking client; every call times out after REDIS_SOCKET_TIMEOUT_S."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_socket_timeout_s,
        health_check_interval=30,
    )


def async_redis_client(settings: Settings) -> redis.asyncio.Redis:
    """An asyncio client for the stream process and the web server."""
    return redis.asyncio.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_socket_timeout_s,
        health_check_interval=30,
    )


def check_redis(settings: Settings) -> None:
    """Raise `ServiceUnavailable` with one line when Redis does not answer PING."""
    try:
        redis_client(settings).ping()
    except redis.RedisError as error:
        raise ServiceUnavailable(f"Redis at {settings.redis_url} is unreachable: {error}") from None
