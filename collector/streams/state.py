"""The explicit, in-memory state of each WebSocket connection and of each stream it carries.

The stream process owns these objects; the sink mirrors them to Redis (`keys.CONNECTIONS`,
`keys.STREAM_MESSAGES`, `keys.STREAM_LAST_US`) on each flush, so `/health` and `collector status`
read what the process itself believes. The record in `keys.CONNECTIONS` is
`collector.queue.connections.ConnectionRecord`, the one definition its readers use too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collector.binance.streams import ConnectionPlan, Family
from collector.queue.connections import ConnectionRecord, Phase
from collector.settings import Market


@dataclass(slots=True)
class StreamStats:
    """Events received on one stream since the process started, and its usual pace."""

    messages: int = 0
    last_message_us: int | None = None
    gap_us: float = 0.0  # moving average of the gap between two of its events
    silenced_at_us: int | None = None  # reported silent and resubscribed; cleared by its next event


@dataclass(slots=True)
class ConnectionState:
    """What one connection is doing now and what it has received. Updated only by its own task."""

    id: str
    market: Market
    family: Family
    url: str
    streams: tuple[str, ...]
    state: Phase = "connecting"
    connected_since_us: int | None = None
    last_message_us: int | None = None
    messages: int = 0
    reconnects: int = 0
    last_error: str | None = None
    stream_stats: dict[str, StreamStats] = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: ConnectionPlan) -> ConnectionState:
        state = cls(plan.connection_id, plan.market, plan.family, plan.url, plan.streams)
        state.stream_stats = {name: StreamStats() for name in plan.streams}
        return state

    def stats_for(self, stream: str) -> StreamStats:
        """Stats of `stream`, created on first sight (a server may send a name we did not plan)."""
        stats = self.stream_stats.get(stream)
        if stats is None:
            stats = self.stream_stats[stream] = StreamStats()
        return stats

    def record(self) -> ConnectionRecord:
        """What `keys.CONNECTIONS` holds for this connection; per-stream stats live in their own hashes."""
        return ConnectionRecord(
            connection_id=self.id,
            market=self.market,
            family=self.family,
            url=self.url,
            streams=self.streams,
            state=self.state,
            connected_since_us=self.connected_since_us,
            last_message_us=self.last_message_us,
            messages=self.messages,
            reconnects=self.reconnects,
            last_error=self.last_error,
        )

    def to_json(self) -> bytes:
        """The value stored in `keys.CONNECTIONS` (`ConnectionRecord.to_json`)."""
        return self.record().to_json()
