"""The one retry predicate: transient failures are retried, permanent ones raised or dead-lettered. Pure."""

from __future__ import annotations

import errno
import socket

import psycopg2
import psycopg2.errors
import pytest
import redis.exceptions
import requests
import websockets.exceptions
from websockets.datastructures import Headers
from websockets.http11 import Response

from collector.errors import ConfigError, FrameError, RateLimited, RestError, ServiceUnavailable
from collector.retry import is_transient


def _ws_status(status: int) -> websockets.exceptions.InvalidStatus:
    return websockets.exceptions.InvalidStatus(Response(status, "", Headers(), b""))


TRANSIENT = [
    ServiceUnavailable("PostgreSQL at x is unreachable"),
    RateLimited("429", 429, 3.0),
    RestError("503", 503),
    RestError("timed out", None),
    psycopg2.OperationalError("server closed the connection unexpectedly"),
    psycopg2.InterfaceError("connection already closed"),
    psycopg2.errors.DeadlockDetected(),
    psycopg2.errors.AdminShutdown(),
    psycopg2.errors.ReadOnlySqlTransaction(),
    redis.exceptions.ConnectionError("Error 111 connecting"),
    redis.exceptions.TimeoutError("Timeout reading from socket"),
    redis.exceptions.BusyLoadingError("LOADING"),
    redis.exceptions.ReadOnlyError("READONLY"),
    redis.exceptions.OutOfMemoryError("OOM command not allowed"),
    requests.ConnectionError("reset"),
    requests.Timeout("read timeout"),
    requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"),
    websockets.exceptions.ConnectionClosedError(None, None),
    _ws_status(503),
    _ws_status(429),
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    TimeoutError(),
    socket.gaierror(-3, "Temporary failure in name resolution"),
    OSError(errno.EHOSTUNREACH, "No route to host"),
]
PERMANENT = [
    FrameError("field 'a' is not a non-negative integer"),
    ConfigError("REDIS_URL: not a URL"),
    RestError("400 -1121 Invalid symbol.", 400),
    psycopg2.DataError("unsupported Unicode escape sequence"),
    psycopg2.errors.UndefinedTable(),
    psycopg2.IntegrityError("duplicate key"),
    redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    redis.exceptions.AuthenticationError("invalid password"),
    redis.exceptions.DataError("Invalid input of type: 'dict'"),
    requests.exceptions.InvalidURL("no host"),
    _ws_status(404),
    websockets.exceptions.InvalidURI("http://x", "scheme isn't ws or wss"),
    FileNotFoundError(errno.ENOENT, "alert.log"),
    PermissionError(errno.EACCES, "alert.log"),
    ValueError("a bug"),
    KeyError("a bug"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_failures_that_pass_on_their_own_are_transient(error: BaseException) -> None:
    """Unreachable or restarting services, timeouts, rate limits and 5XX may succeed if tried again."""
    assert is_transient(error)


@pytest.mark.parametrize("error", PERMANENT, ids=lambda e: type(e).__name__)
def test_bad_data_settings_and_bugs_are_permanent(error: BaseException) -> None:
    """Rejected values, missing tables, wrong types, 4XX and local mistakes give the same answer again."""
    assert not is_transient(error)
