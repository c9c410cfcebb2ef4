"""The connection-state record: what the stream process says about each WebSocket connection.

One JSON value per connection in the hash `keys.CONNECTIONS` (field = connection id). The stream
process writes it (`collector.streams.state.ConnectionState.record()`, mirrored by the sink on every
flush where it changed); `/health`, `/metrics` and `collector status` read it back with
`ConnectionRecord.from_json`. Per-stream counts live in their own hashes (`keys.STREAM_MESSAGES`,
`keys.STREAM_LAST_US`), not here.

Reading is lenient: the writer may be another version of the collector, so a missing field takes
its default; `read_connections` turns an unreadable value into a record in state `unknown` that says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

logger = logging.getLogger(__name__)

Phase = Literal["connecting", "connected", "backoff", "stopped"]
PHASES: Final[tuple[Phase, ...]] = ("connecting", "connected", "backoff", "stopped")
CONNECTED: Final = "connected"
UNKNOWN: Final = "unknown"  # what a reader says when the record has no readable state


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """One WebSocket connection as the stream process last described it."""

    connection_id: str  # stored under "id"
    market: str = ""
    family: str = ""
    url: str = ""
    streams: tuple[str, ...] = ()
    state: str = UNKNOWN  # one of PHASES when written by the stream process
    connected_since_us: int | None = None
    last_message_us: int | None = None
    messages: int = 0
    reconnects: int = 0
    last_error: str | None = None

    def to_json(self) -> bytes:
        """The value stored in `keys.CONNECTIONS` under the connection's id."""
        return orjson.dumps(
            {
                "id": self.connection_id,
                "market": self.market,
                "family": self.family,
                "url": self.url,
                "streams": list(self.streams),
                "state": self.state,
                "connected_since_us": self.connected_since_us,
                "last_message_us": self.last_message_us,
                "messages": self.messages,
                "reconnects": self.reconnects,
                "last_error": self.last_error,
            }
        )

    @classmethod
    def from_json(cls, connection_id: str, raw: bytes | str) -> ConnectionRecord:
        """The record stored under `connection_id`; `ValueError` when it is not a JSON object."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as bad:
            raise ValueError(f"connection state is not JSON: {bad}") from None
        if not isinstance(data, dict):
            raise ValueError("connection state is not a JSON object")
        streams = data.get("streams")
        last_error = data.get("last_error")
        return cls(
            connection_id=connection_id,
            market=str(data.get("market") or ""),
            family=str(data.get("family") or ""),
            url=str(data.get("url") or ""),
            streams=tuple(str(s) for s in streams) if isinstance(streams, list) else (),
            state=str(data.get("state") or UNKNOWN),
            connected_since_us=_int_or_none(data.get("connected_since_us")),
            last_message_us=_int_or_none(data.get("last_message_us")),
            messages=_int_or_none(data.get("messages")) or 0,
            reconnects=_int_or_none(data.get("reconnects")) or 0,
            last_error=str(last_error) if last_error else None,
        )


def read_connections(fields: dict[Any, Any]) -> list[ConnectionRecord]:
    """The records of an HGETALL of `keys.CONNECTIONS`, sorted by connection id; never raises."""
    records = []
    for field, raw in fields.items():
        connection_id = _text(field)
        try:
            records.append(ConnectionRecord.from_json(connection_id, raw))
        except ValueError as error:
            logger.warning("connections.unreadable connection=%s error=%s", connection_id, error)
            records.append(ConnectionRecord(connection_id, last_error="unreadable state in Redis"))
    return sorted(records, key=lambda record: record.connection_id)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _int_or_none(value: object) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    try:
        return int(float(str(value)))
    except (ValueError, OverflowError):
        return None
