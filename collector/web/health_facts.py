"""Health facts: what Redis and PostgreSQL said at one moment, as plain data. Pure.

`collector.web.health_gather` reads them, `collector.web.health_judge` judges them,
`collector.web.health_render` and `collector.web.status` show them, `collector.web.metrics` exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from collector.audit import Loss
from collector.queue.connections import ConnectionRecord
from collector.queue.loop_lag import LoopLag, worst_loop_lag
from collector.queue.spill_stats import SpillFigures, drain_eta_s
from collector.queue.stream_shards import ShardRecord


@dataclass(frozen=True)
class StreamState:
    """Events received on one `<market>:<stream>` and when the last one arrived."""

    market: str
    stream: str
    messages: int
    last_message_us: int | None


@dataclass(frozen=True)
class TableState:
    """One table's Redis queue, its in-flight batch, and its last committed drain."""

    table: str
    queue_length: int
    inflight_length: int
    last_drain_us: int | None


@dataclass(frozen=True)
class OpenGap:
    """A gap of the ledger not closed yet: a depth chain awaiting its resync, or a stream outage."""

    kind: str  # "depth" or "stream"
    market: str
    name: str  # the symbol (depth) or the stream
    since_us: int
    cause: str


@dataclass
class HealthSnapshot:
    """Everything the monitoring views show, read at one moment. Empty lists when Redis is down."""

    redis_up: bool
    postgres_up: bool
    redis_error: str | None = None
    postgres_error: str | None = None
    # Which mode the database is in (`collector.db.timescale.describe`): mode, ok, detail.
    database: dict[str, Any] | None = None
    # Envelopes lost between the stream process and PostgreSQL in the last LOSS_WINDOW (collector.audit).
    losses: list[Loss] = field(default_factory=list)
    connections: list[ConnectionRecord] = field(default_factory=list)
    streams: list[StreamState] = field(default_factory=list)
    tables: list[TableState] = field(default_factory=list)
    deadletter_length: int = 0
    drain_loops: int = 0  # drain loops running now, over every worker (DRAIN_LOOPS at most)
    open_gaps: list[OpenGap] = field(default_factory=list)
    # counter name -> label values -> value
    counters: dict[str, dict[tuple[str, ...], int]] = field(default_factory=dict)
    # Each stream process (shard `i/n`, `0/1` unsharded): its record and its own loop lag.
    shards: list[ShardRecord] = field(default_factory=list)
    loop_lags: dict[str, LoopLag] = field(default_factory=dict)
    # The stream process's spill and its view of the queues (collector.streams.pressure); None before it ran.
    spill: SpillFigures | None = None

    @property
    def loop_lag(self) -> LoopLag | None:
        """The stream processes' worst event-loop block (collector.streams.lag); None before one ran."""
        return worst_loop_lag(self.loop_lags.values())

    @property
    def backlog(self) -> Backlog:
        """Envelopes waiting to be stored: in the Redis lists, in flight, and spilled to disk."""
        spill = self.spill
        return Backlog(
            queued=sum(t.queue_length for t in self.tables),
            in_flight=sum(t.inflight_length for t in self.tables),
            spilled=spill.envelopes if spill else 0,
            spill_bytes=spill.bytes if spill else 0,
            drain_rate=spill.drain_rate if spill else None,
        )


@dataclass(frozen=True)
class Backlog:
    """What waits to be stored, and how long it takes at the drains' recent pace."""

    queued: int
    in_flight: int
    spilled: int
    spill_bytes: int
    drain_rate: float | None  # envelopes/s (None: no stream process published it)

    @property
    def total(self) -> int:
        return self.queued + self.in_flight + self.spilled

    @property
    def eta_s(self) -> float | None:
        """Seconds to drain it all at the recent pace; None when nothing drains or the pace is unknown."""
        return None if self.drain_rate is None else drain_eta_s(self.total, self.drain_rate)


def age_s(then_us: int | None, now: int) -> float | None:
    """Seconds from `then_us` to `now`, never negative (clocks of two processes may differ slightly)."""
    if then_us is None:
        return None
    return max(0.0, (now - then_us) / 1_000_000)
