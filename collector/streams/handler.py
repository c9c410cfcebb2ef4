"""The receive handler: one frame and its receive time in, an envelope (or dead letter) into the sink.

It knows nothing of WebSockets, so the same object serves any transport that hands it frames
(`Callable[[bytes, int], None]`, as nautilus_trader's WebSocket client takes a `handler`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from collector.queue.deadletter import DeadLetter
from collector.streams.ledger import GapLedger
from collector.streams.routing import route_message
from collector.streams.silence import SILENCE_EWMA_WEIGHT
from collector.streams.sink import Sink
from collector.streams.state import ConnectionState

logger = logging.getLogger(__name__)

# A stream that sends garbage sends a lot of it: log the first few dead letters of a connection
# and then one in every N, with the running count.
DEADLETTER_LOG_FIRST: Final = 10
DEADLETTER_LOG_EVERY: Final = 1000


class FrameHandler:
    """Routes every frame of one connection into the sink and counts it in the connection's state."""

    __slots__ = ("_deadletters", "_ledger", "_market", "_sink", "_source", "on_server_shutdown", "state")

    def __init__(
        self,
        state: ConnectionState,
        sink: Sink,
        on_server_shutdown: Callable[[], None] | None = None,
        ledger: GapLedger | None = None,
        source: str = "",
    ) -> None:
        self.state = state
        self._sink = sink
        # Checks every diff-depth event's place in its symbol's update-id chain.
        self._ledger = ledger
        self._source = source or state.id  # the physical connection, when a replacement overlaps
        self._market = state.market
        self._deadletters = 0
        # Called when the server announces it is going down; the connection is then replaced.
        self.on_server_shutdown = on_server_shutdown

    def __call__(self, frame: bytes, received_at_us: int) -> None:
        (kind, stream, table, reason), message = route_message(frame)
        if kind == "event":
            if table != "depth_updates" or self._ledger is None:
                self._sink.push_event(table, self._market, received_at_us, frame, stream)
            elif self._ledger.on_depth(self._market, stream, message["data"], received_at_us, self._source):
                self._sink.push_event(table, self._market, received_at_us, frame, stream)
            state = self.state
            stats = state.stream_stats.get(stream) or state.stats_for(stream)
            if stats.last_message_us is not None:
                stats.gap_us += (received_at_us - stats.last_message_us - stats.gap_us) * SILENCE_EWMA_WEIGHT
            stats.messages += 1
            stats.last_message_us = received_at_us
            if stats.silenced_at_us is not None:
                stats.silenced_at_us = None
                if self._ledger is not None:
                    self._ledger.stream_recovered(state, stream, received_at_us)
            state.messages += 1
            state.last_message_us = received_at_us
        elif kind == "control":
            logger.debug("ws.control id=%s frame=%r", self.state.id, frame[:200])
        elif kind == "shutdown":
            logger.warning("ws.server_shutdown id=%s frame=%r", self.state.id, frame[:200])
            if self.on_server_shutdown is not None:
                self.on_server_shutdown()
        else:
            self._deadletter(reason, frame, received_at_us)

    def _deadletter(self, reason: str, frame: bytes, received_at_us: int) -> None:
        state = self.state
        letter = DeadLetter(reason, "streams", state.market, None, received_at_us, frame, connection=state.id)
        self._sink.push_deadletter(letter)
        self._deadletters += 1
        count = self._deadletters
        if count <= DEADLETTER_LOG_FIRST or count % DEADLETTER_LOG_EVERY == 0:
            logger.warning("ws.deadletter id=%s reason=%s count=%d", state.id, reason, count)
