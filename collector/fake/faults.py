"""Connection faults of the fake exchange as plain data: message-rate window, silences, shutdown notice.

Binance's connection rules (binance.md §2) as named constants, the per-connection incoming-message
window, the record of what a silent connection did not deliver, and the identity of a depth event
that the ledger lists when it is withheld or lost. No I/O and no clock: callers pass the times.
"""

from __future__ import annotations

import json
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from collector.fake.generators import Event
from collector.fake.names import Kind, PathFamily

# "A single connection ... is only valid for 24 hours" on spot and USD-M (binance.md §2).
MAX_CONNECTION_AGE_S = 24 * 3600.0
# Incoming messages per second per connection: 5 on spot, 10 on USD-M; beyond that "the connection
# will be disconnected" with 1008 "Too many requests" (binance.md §2, §7 #3). Spot counts PING and
# JSON control frames; the USD-M page names no frame types, so only JSON messages count there.
SPOT_MAX_INCOMING_PER_S = 5
FUTURES_MAX_INCOMING_PER_S = 10
INCOMING_WINDOW_S = 1.0
CLOSE_POLICY_VIOLATION = 1008  # Binance's close for "Too many requests" and too many streams
# Binance documents no close code for the 24 h cut or a server restart; clients report 1001 going
# away with no reason (python-binance #975, #1608), which RFC 6455 §7.4.1 defines for a server going down.
CLOSE_GOING_AWAY = 1001
# Spot announces a restart with `{"e":"serverShutdown","E":...}`, combined name `!serverShutdown`
# (binance.md §2, added 2026-05-08); USD-M documents no notice (binance.md §8), so it closes unannounced.
SERVER_SHUTDOWN_STREAM = "!serverShutdown"
NOTICE_FAMILIES: frozenset[PathFamily] = frozenset({"spot"})


def market_of(family: PathFamily) -> str:
    """The market a connection path belongs to: "spot", or "futures" for /public, /market and legacy."""
    return "spot" if family == "spot" else "futures"


def max_incoming_per_s(family: PathFamily) -> int:
    return SPOT_MAX_INCOMING_PER_S if family == "spot" else FUTURES_MAX_INCOMING_PER_S


def shutdown_notice(event_time_ms: int) -> bytes:
    """The notice frame on a combined-stream connection (the fake serves only `/stream` paths)."""
    return b'{"stream":"%s","data":{"e":"serverShutdown","E":%d}}' % (
        SERVER_SHUTDOWN_STREAM.encode(),
        event_time_ms,
    )


class IncomingWindow:
    """Incoming messages of one connection over the last second; `over` once the limit is passed."""

    def __init__(self, limit: int, window_s: float = INCOMING_WINDOW_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self.total = 0
        self._times: deque[float] = deque()

    def count(self, now_s: float) -> bool:
        """Count one message arriving at `now_s` (monotonic); True if it makes the last second too many."""
        self.total += 1
        times = self._times
        times.append(now_s)
        while now_s - times[0] >= self.window_s:
            times.popleft()
        return len(times) > self.limit


def depth_identity(event: Event) -> dict[str, Any]:
    """market, symbol, U, u (and pu on futures) and E of a depthUpdate event, for the ledger.

    Read back from the payload: only withheld or lost events need it, so producing stays one `%`.
    """
    assert event.key is not None
    market, symbol, _, _ = event.key
    payload = json.loads(event.data)
    identity = {"market": market, "symbol": symbol, "U": payload["U"], "u": payload["u"]}
    if "pu" in payload:
        identity["pu"] = payload["pu"]
    identity["E"] = payload["E"]
    return identity


@dataclass
class LostStream:
    """What one stream of a silent connection did not deliver."""

    kind: Kind
    market: str
    symbol: str | None
    count: int = 0
    a: array[int] = field(default_factory=lambda: array("q"))  # aggTrade ids
    U: array[int] = field(default_factory=lambda: array("q"))  # depth first update ids
    u: array[int] = field(default_factory=lambda: array("q"))  # depth last update ids
    pu: array[int] = field(default_factory=lambda: array("q"))  # futures depth previous u

    def add(self, event: Event) -> None:
        self.count += 1
        if self.kind == "aggTrade":
            assert event.key is not None
            self.a.append(event.key[2])
        elif self.kind == "depth":
            identity = depth_identity(event)
            self.U.append(identity["U"])
            self.u.append(identity["u"])
            if "pu" in identity:
                self.pu.append(identity["pu"])

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": self.kind,
            "market": self.market,
            "symbol": self.symbol,
            "count": self.count,
        }
        if self.kind == "aggTrade":
            body["a"] = list(self.a)
        elif self.kind == "depth":
            if self.market == "futures":
                body["updates"] = [
                    {"U": U, "u": u, "pu": pu} for U, u, pu in zip(self.U, self.u, self.pu, strict=True)
                ]
            else:
                body["updates"] = [{"U": U, "u": u} for U, u in zip(self.U, self.u, strict=True)]
        return body


@dataclass
class Silence:
    """One silent interval of one connection and, per stream, what it did not deliver."""

    connection_id: int
    path: str
    start_ms: int
    end_ms: int | None = None
    streams: dict[str, LostStream] = field(default_factory=dict)

    def stream(self, name: str, kind: Kind, market: str, symbol: str | None) -> LostStream:
        lost = self.streams.get(name)
        if lost is None:
            lost = self.streams[name] = LostStream(kind, market, symbol)
        return lost

    @property
    def count(self) -> int:
        return sum(lost.count for lost in self.streams.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "connection": self.connection_id,
            "path": self.path,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "count": self.count,
            "streams": {name: lost.as_json() for name, lost in self.streams.items()},
        }
