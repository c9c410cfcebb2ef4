"""Where one received frame goes: a table's queue, the dead-letter list, or nowhere (control). Pure.

Binance combined streams wrap every event as `{"stream": "<name>", "data": <payload>}` (binance.md
§1.1); the stream name alone decides the table. Routing parses the frame once with orjson (which
also proves it is JSON, so the envelope can embed it byte for byte) and looks nothing else up.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Final, Literal, NamedTuple

import orjson

from collector.binance.streams import table_for_stream

RouteKind = Literal["event", "control", "shutdown", "deadletter"]

# Spot announces a server restart with `{"e":"serverShutdown","E":...}`, combined name
# `!serverShutdown`; the client should reconnect at once (binance.md §2, added 2026-05-08).
SERVER_SHUTDOWN_STREAM: Final = "!serverShutdown"
SERVER_SHUTDOWN_EVENT: Final = "serverShutdown"


class Route(NamedTuple):
    """The decision for one frame: `table`/`stream` for events, `reason` for everything else ("" = none)."""

    kind: RouteKind
    stream: str = ""
    table: str = ""
    reason: str = ""


CONTROL: Final = Route("control", reason="subscription response")
SHUTDOWN: Final = Route("shutdown", stream=SERVER_SHUTDOWN_STREAM, reason="server shutdown announced")
_NOT_JSON: Final = Route("deadletter", reason="frame is not JSON")
_NOT_OBJECT: Final = Route("deadletter", reason="frame is not a JSON object")
_NOT_COMBINED: Final = Route("deadletter", reason="frame is not a combined-stream message (stream, data)")


@lru_cache(maxsize=4096)
def _stream_route(stream: str) -> Route:
    """Route of an event on `stream`; cached because a connection carries a fixed set of names."""
    if stream == SERVER_SHUTDOWN_STREAM:
        return SHUTDOWN
    table = table_for_stream(stream)
    if table is None:
        return Route("deadletter", stream=stream, reason=f"stream {stream!r} feeds no table")
    return Route("event", stream=stream, table=table)


def route(frame: bytes) -> Route:
    """Decide where `frame` (one WebSocket message, exactly as received) goes."""
    return route_message(frame)[0]


def route_message(frame: bytes) -> tuple[Route, Any]:
    """`route`, plus the parsed message for whoever needs more than its table (sequence checks)."""
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return _NOT_JSON, None
    if type(message) is not dict:
        return _NOT_OBJECT, message
    stream = message.get("stream")
    if type(stream) is str and "data" in message:
        return _stream_route(stream), message
    if stream is None:
        return _route_unwrapped(message), message
    return _NOT_COMBINED, message


def _route_unwrapped(message: dict[str, object]) -> Route:
    """A frame without `stream`: a SUBSCRIBE response, a raw shutdown notice, or garbage."""
    if "id" in message and "result" in message:
        return CONTROL  # `{"result": null, "id": 1}` answers a SUBSCRIBE (binance.md §1.3)
    if message.get("e") == SERVER_SHUTDOWN_EVENT:
        return SHUTDOWN
    if "error" in message:
        return Route("deadletter", reason=f"server error message: {message['error']!r}"[:300])
    return _NOT_COMBINED
