"""What the fake exchange wrote to its sockets, and what it deliberately did not: keys, faults, counts.

An event is recorded the first time a connection writes it, so the tables list unique keys even when
several connections carry the same event (an all-market stream on two connections). Keys are kept
as integer arrays per (market, symbol), about 16 bytes an event, so a long full-speed benchmark
does not fill the memory. Withheld depth events (sent on no connection) and what each silent
connection lost are listed apart and never in the tables, unless another connection wrote them.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from collector.fake.faults import Silence
from collector.fake.generators import AGG_TRADES, DEPTH_UPDATES, FORCE_ORDERS, MARK_PRICES, Event


@dataclass
class ServerClose:
    """A close the server started: code and reason sent, why, and when (ms)."""

    code: int
    reason: str
    cause: str  # max_age | shutdown | rate_limit | too_many_streams | pong_timeout | stop
    at_ms: int

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "reason": self.reason, "cause": self.cause, "at_ms": self.at_ms}


@dataclass
class ConnectionCounts:
    """Frames written on one connection, frames it lost while silent, and how it ended."""

    connection_id: int
    path: str
    streams: tuple[str, ...]
    opened_ms: int = 0
    data_frames: int = 0
    malformed: int = 0
    control_frames: int = 0
    incoming_messages: int = 0  # client messages counted against Binance's per-second limit
    not_delivered: int = 0  # data events lost while silent (details in Ledger.silences)
    shutdown_notice_ms: int | None = None
    server_close: ServerClose | None = None
    open: bool = True

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.connection_id,
            "path": self.path,
            "streams": list(self.streams),
            "opened_ms": self.opened_ms,
            "data_frames": self.data_frames,
            "malformed": self.malformed,
            "control_frames": self.control_frames,
            "incoming_messages": self.incoming_messages,
            "not_delivered": self.not_delivered,
            "shutdown_notice_ms": self.shutdown_notice_ms,
            "server_close": self.server_close.as_json() if self.server_close else None,
            "open": self.open,
        }


class Ledger:
    """Natural keys of every data event written, by table, plus malformed and per-connection counts."""

    def __init__(self) -> None:
        # (market, symbol) -> (ids, times): agg_trades (a, T), depth_updates (u, E).
        self._pairs: dict[str, dict[tuple[str, str], tuple[array[int], array[int]]]] = {
            AGG_TRADES: {},
            DEPTH_UPDATES: {},
        }
        self._marks: dict[str, array[int]] = {}
        self._force_orders: list[tuple[Any, ...]] = []
        self.coin_m_rows = 0
        self.coin_m_force_orders = 0
        self.malformed_sent = 0
        self.data_frames_sent = 0
        self.connections: dict[int, ConnectionCounts] = {}
        self.withheld: list[dict[str, Any]] = []  # depth_identity() of each withheld event, in order
        self.silences: list[Silence] = []

    def record(self, event: Event) -> None:
        """Count one written data frame; keep its keys if this is the event's first write."""
        self.data_frames_sent += 1
        if event.sent:
            return
        event.sent = True
        table = event.table
        if table == MARK_PRICES:
            for symbol, event_time in event.rows:
                times = self._marks.get(symbol)
                if times is None:
                    times = self._marks[symbol] = array("q")
                times.append(event_time)
            self.coin_m_rows += event.coin_m
            return
        key = event.key
        if table == FORCE_ORDERS:
            if key is None:
                self.coin_m_force_orders += event.coin_m
            else:
                self._force_orders.append(key)
            return
        assert key is not None
        market, symbol, ident, when = key
        pair = self._pairs[table].get((market, symbol))
        if pair is None:
            pair = self._pairs[table][(market, symbol)] = (array("q"), array("q"))
        pair[0].append(ident)
        pair[1].append(when)

    def as_json(self) -> dict[str, Any]:
        """The ledger as the `GET /_fake/ledger` body."""
        tables: dict[str, Any] = {}
        for table, per_symbol in self._pairs.items():
            tables[table] = [
                [market, symbol, ident, when]
                for (market, symbol), (ids, times) in per_symbol.items()
                for ident, when in zip(ids, times, strict=True)
            ]
        tables[MARK_PRICES] = [[symbol, when] for symbol, times in self._marks.items() for when in times]
        tables[FORCE_ORDERS] = [list(key) for key in self._force_orders]
        return {
            **tables,
            "coin_m_rows": self.coin_m_rows,
            "coin_m_force_orders": self.coin_m_force_orders,
            "malformed_sent": self.malformed_sent,
            "data_frames_sent": self.data_frames_sent,
            "connections": [counts.as_json() for counts in self.connections.values()],
            "withheld": list(self.withheld),
            "silences": [silence.as_json() for silence in self.silences],
        }
