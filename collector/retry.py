"""Retry classification: one pure predicate says whether a failure is worth trying again.

`is_transient(error)` answers "may the very same operation succeed later, with nobody changing
anything?" It is used at every I/O edge, so the drain, the alert task, the REST client and the
stream process agree on what a transient failure is:

- transient: a service that cannot be reached or is restarting (connection refused or reset, a
  timeout, PostgreSQL shutting down or out of connections, Redis loading or failing over), a
  deadlock or serialisation failure, a Binance rate limit, a Binance 5XX (binance.md §4.5) or a
  dropped WebSocket. The caller keeps its work (the batch stays in flight, the cursor unmoved) and
  the next run, or its backoff, tries again.
- permanent: everything else, above all the caller's own mistakes and bad data (a value PostgreSQL
  rejects, a missing table, a Redis command on the wrong type, a 4XX from Binance, a bad setting,
  a frame that cannot be parsed). Trying again gives the same answer: raise it, or dead-letter it.

Pure: it only looks at the exception (its type, HTTP status or errno); it never does I/O. REST
answers that are not exceptions are judged by `collector.binance.rest.classify`, with the same
rules for 429/418, 5XX and 4XX.
"""

from __future__ import annotations

import errno
import socket

import psycopg2
import psycopg2.errors
import redis.exceptions
import requests
import websockets.exceptions

from collector.errors import ConfigError, FrameError, RateLimited, RestError, ServiceUnavailable

# errnos of a network that is down or a peer that went away, not of a file or a permission.
NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
        errno.EADDRNOTAVAIL,
    }
)

# PostgreSQL failures that go away on their own: the connection (refused, reset, server shutting
# down or out of connections), deadlocks, timeouts, a closed connection (reconnect), and a server
# that became a read-only replica during a failover.
_POSTGRES_TRANSIENT = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    psycopg2.errors.ReadOnlySqlTransaction,
)
# Redis replies that mean "not now": loading its data, failing over, or out of memory until the
# drains catch up. Every other reply error (wrong type, no such script, no permission) is ours.
_REDIS_TRANSIENT = (
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.MasterDownError,
    redis.exceptions.ClusterDownError,
)

# No answer, or an answer cut off mid-body (a dropped connection); not a malformed URL or request.
_HTTP_TRANSIENT = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


def is_transient(error: BaseException) -> bool:
    """True when trying the same operation again later may succeed (see the module docstring)."""
    if isinstance(error, FrameError | ConfigError):
        return False
    if isinstance(error, RateLimited | ServiceUnavailable):
        return True
    if isinstance(error, RestError):
        # 5XX means "status unknown" on Binance (binance.md §4.5); no status: no answer came.
        return error.status is None or error.status >= 500
    if isinstance(error, psycopg2.Error):
        return isinstance(error, _POSTGRES_TRANSIENT)
    if isinstance(error, redis.exceptions.RedisError):
        return _redis_transient(error)
    if isinstance(error, requests.RequestException):
        return isinstance(error, _HTTP_TRANSIENT)
    if isinstance(error, websockets.exceptions.WebSocketException):
        return _websocket_transient(error)
    return _os_transient(error)


def _redis_transient(error: redis.exceptions.RedisError) -> bool:
    if isinstance(error, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError):
        return False  # a wrong password does not fix itself (both are ConnectionError subclasses)
    return isinstance(error, (redis.exceptions.ConnectionError, *_REDIS_TRANSIENT))


def _websocket_transient(error: websockets.exceptions.WebSocketException) -> bool:
    if isinstance(error, websockets.exceptions.InvalidStatus):
        status = error.response.status_code
        return status >= 500 or status in (408, 418, 429)
    # A malformed URI or a refused upgrade stays so; a dropped or garbled connection does not.
    return not isinstance(error, websockets.exceptions.InvalidURI | websockets.exceptions.InvalidUpgrade)


def _os_transient(error: BaseException) -> bool:
    if isinstance(error, ConnectionError | TimeoutError | socket.gaierror):
        return True
    return isinstance(error, OSError) and error.errno in NETWORK_ERRNOS
