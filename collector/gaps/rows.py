"""The rows of the gap tables (`depth_gaps`, `stream_gaps`), read from the records `records` queues. Pure.

Like the market tables' rows (`collector.binance.rows`), each row type's fields are its table's
`collector.db.schema.COPY_COLUMNS` in order, times in µs since the epoch, and a record that PostgreSQL
would reject raises `FrameError`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from collector.binance.rows import (
    Extractor,
    ParsedEnvelope,
    as_object,
    envelope_market,
    int_field,
    one_row,
    opt_int_field,
    symbol_value,
    text_field,
)
from collector.errors import FrameError


class DepthGapRow(NamedTuple):
    detected_at: int
    market: str
    symbol: str
    last_update_id: int | None
    next_update_id: int | None
    resynced_at: int | None
    resync_update_id: int | None
    cause: str


class StreamGapRow(NamedTuple):
    started_at: int
    market: str
    stream: str
    ended_at: int | None
    cause: str
    connection: str | None


ROW_TYPES: dict[str, type[tuple[Any, ...]]] = {
    "depth_gaps": DepthGapRow,
    "stream_gaps": StreamGapRow,
}


def _depth_gap(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    """A gap record of the stream process (collector.gaps.records.DepthGap)."""
    record = as_object(envelope.get("frame"), "depth gap record")
    row = DepthGapRow(
        int_field(record, "detected_at_us"),
        envelope_market(envelope),
        symbol_value(record.get("symbol")),
        opt_int_field(record, "last_update_id"),
        opt_int_field(record, "next_update_id"),
        opt_int_field(record, "resynced_at_us"),
        opt_int_field(record, "resync_update_id"),
        text_field(record, "cause"),
    )
    return one_row(row)


def _stream_gap(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    """A gap record of the stream process (collector.gaps.records.StreamGap)."""
    record = as_object(envelope.get("frame"), "stream gap record")
    stream = record.get("stream")
    if not isinstance(stream, str) or not stream or len(stream) > 200:
        raise FrameError(f"stream gap record has no stream name: {stream!r}")
    connection = record.get("connection")
    row = StreamGapRow(
        int_field(record, "started_at_us"),
        envelope_market(envelope),
        stream,
        opt_int_field(record, "ended_at_us"),
        text_field(record, "cause"),
        connection if isinstance(connection, str) else None,
    )
    return one_row(row)


EXTRACTORS: dict[str, Extractor] = {
    "depth_gaps": _depth_gap,
    "stream_gaps": _stream_gap,
}
