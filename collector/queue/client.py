"""Redis clients with timeouts, and the start-up check that names the service when it is down."""

from __future__ import annotations

import redis
import redis.asyncio

from collector.errors import ServiceUnavailable
from collector.settings import Settings, redacted_url


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
    client = redis_client(settings)
    try:
        client.ping()
    except redis.RedisError as error:
        raise redis_unavailable(settings, error) from None
    finally:
        client.close()


def redis_unavailable(settings: Settings, error: redis.RedisError) -> ServiceUnavailable:
    """One line for a failed Redis call, with the hint that fits: a Redis that is not there
    wants starting, one that answered and refused wants a different REDIS_URL."""
    where = f"Redis at {redacted_url(settings.redis_url)}"
    return ServiceUnavailable(f"{where} {describe_redis_error(error)}")


def describe_redis_error(error: redis.RedisError) -> str:
    """`is unreachable: … (start Redis, or set REDIS_URL)` or `refused …: … (<what to fix>)`. Pure."""
    # These two are ConnectionErrors in redis-py, but Redis did answer (NOAUTH, WRONGPASS, NOPERM).
    if isinstance(error, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return f"refused the connection: {error} (check the user and password in REDIS_URL)"
    if isinstance(error, redis.ResponseError):
        if "DB index is out of range" in str(error):
            # SELECT n fails past the server's `databases` setting (16 unless redis.conf says otherwise).
            return f"refused the connection: {error} (REDIS_URL names a database this server does not have)"
        return f"refused the connection: {error} (check REDIS_URL)"
    return f"is unreachable: {error} (start Redis, or set REDIS_URL)"
