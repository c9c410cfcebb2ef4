"""The gap records the stream process queues for `depth_gaps` and `stream_gaps`. Pure.

A record travels like a market event: an envelope `{"market", "received_at_us", "frame"}` in the
table's Redis queue, drained into PostgreSQL. A gap is queued when it opens (its end fields null)
and again when it closes; both carry the natural key, so the drain merges them in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from collector.queue.envelope import make_envelope


@dataclass
class DepthGap:
    """A hole in one symbol's diff-depth chain, open until a snapshot lines up with the diffs again."""

    market: str
    symbol: str
    detected_at_us: int
    last_update_id: int | None  # last good `u` (None: not known)
    next_update_id: int | None  # `U` of the first event after the hole
    cause: str
    resynced_at_us: int | None = None
    resync_update_id: int | None = None

    def envelope(self) -> bytes:
        frame = {
            "symbol": self.symbol,
            "detected_at_us": self.detected_at_us,
            "last_update_id": self.last_update_id,
            "next_update_id": self.next_update_id,
            "resynced_at_us": self.resynced_at_us,
            "resync_update_id": self.resync_update_id,
            "cause": self.cause,
        }
        stamp = self.resynced_at_us or self.detected_at_us
        return make_envelope(self.market, stamp, orjson.dumps(frame))


@dataclass
class StreamGap:
    """An interval in which one stream could not receive (its connection was down or silent)."""

    market: str
    stream: str
    started_at_us: int
    cause: str
    connection: str
    ended_at_us: int | None = None

    def envelope(self) -> bytes:
        frame = {
            "stream": self.stream,
            "started_at_us": self.started_at_us,
            "ended_at_us": self.ended_at_us,
            "cause": self.cause,
            "connection": self.connection,
        }
        return make_envelope(self.market, self.ended_at_us or self.started_at_us, orjson.dumps(frame))
