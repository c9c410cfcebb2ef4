"""The fake exchange's shared state: one event source per stream, the knobs, and the ledger.

A source produces its events on demand and, while several subscriptions share it, keeps the last
few in a ring; each subscription holds a cursor into it, so every connection carrying a stream sees
the same events in the same order (a depth chain stays valid on each) while the fastest one drives
production. An event is produced and handed to the socket in one synchronous step, so a REST
snapshot (`lastUpdateId` = the last produced `u`) never runs ahead of what was written. A withheld
depth event is produced (the book and its ids advance) and handed to no subscription at all.
Everything here runs on the server's event loop thread; nothing blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from collector.fake.faults import MAX_CONNECTION_AGE_S, depth_identity
from collector.fake.generators import (
    AggTradeGen,
    DepthGen,
    Event,
    ForceOrders,
    Market,
    MarkPrices,
    reference_price,
    symbol_rng,
)
from collector.fake.ledger import Ledger
from collector.fake.names import PathFamily, StreamRef
from collector.fake.recordings import DepthReplay, Recordings, TradeReplay

RING_SIZE = 2048  # events a lagging subscriber may fall behind before it skips (like a slow consumer)
# Liquidations in paced mode: one all-market object every 250 ms at most, one per symbol every 2 s;
# the per-symbol 1000 ms rule of binance.md §3.7 is applied on top by ForceOrders.
FORCE_ALL_PERIOD_MS = 250
FORCE_SYMBOL_PERIOD_MS = 2000


class Book(Protocol):
    """A depth stream's producer that can also answer a REST snapshot."""

    @property
    def last_update_id(self) -> int: ...

    def next(self, now_ms: int) -> Event: ...

    def snapshot(self, limit: int) -> tuple[int, list[list[str]], list[list[str]]]: ...


def now_ms() -> int:
    return int(time.time() * 1000)


class Source:
    """One stream's event sequence, shared by every subscription to it.

    `produce(now_ms, paced)` returns the next event, or None when a periodic stream is not due. A
    periodic source (mark price, liquidations) follows its own clock in paced mode and does not use
    the connection's rate; in full-speed mode it produces on every turn.
    """

    def __init__(self, produce: Callable[[int, bool], Event | None], period_ms: int | None = None) -> None:
        self._produce = self._plain = produce
        self._withhold = 0
        self._on_withheld: Callable[[Event], None] | None = None
        self.period_ms = period_ms
        self.periodic = period_ms is not None
        self.head = 0  # index of the next event to produce
        self.subscribers = 0
        # Kept only while several subscriptions share the source: a lone subscriber is always at the
        # head, and one that joins later starts at the head, so it never needs older events.
        self._ring: list[Event | None] = []
        self._last_ms = -(10**15)

    def take(self, cursor: int, now: int, paced: bool) -> tuple[Event | None, int]:
        """The event at `cursor` (producing it if needed) and the next cursor."""
        head = self.head
        if cursor < head:
            if cursor < head - RING_SIZE:
                cursor = head - RING_SIZE  # fell out of the ring: skip, as a slow consumer would
            kept = self._ring[cursor % RING_SIZE] if self._ring else None
            if kept is not None:
                return kept, cursor + 1
            cursor = head  # never kept (cannot happen by construction): continue from the head
        if paced and self.period_ms is not None and now - self._last_ms < self.period_ms:
            return None, cursor
        event = self._produce(now, paced)
        if event is None:
            return None, cursor
        self._last_ms = now
        if self.subscribers > 1:
            if not self._ring:
                self._ring = [None] * RING_SIZE
            self._ring[head % RING_SIZE] = event
        self.head = head + 1
        return event, head + 1

    def withhold(self, count: int, on_withheld: Callable[[Event], None]) -> None:
        """Produce the next `count` events as usual but give them to `on_withheld`, not to subscribers.

        The producer is swapped only while events are pending, so the usual path pays nothing.
        """
        self._withhold += count
        self._on_withheld = on_withheld
        if self._withhold > 0:
            self._produce = self._withholding

    def _withholding(self, now: int, paced: bool) -> Event | None:
        on_withheld = self._on_withheld
        assert on_withheld is not None
        while self._withhold > 0:
            event = self._plain(now, paced)
            if event is None:
                return None
            self._withhold -= 1
            on_withheld(event)
        self._produce = self._plain
        return self._plain(now, paced)


@dataclass
class Subscription:
    """One served stream name on one connection: its envelope prefix, its source and a cursor."""

    name: str
    prefix: bytes
    source: Source
    ref: StreamRef
    cursor: int = 0

    def envelope(self, event: Event) -> bytes:
        # Binance's combined-stream envelope {"stream":"<name>","data":<payload>} (binance.md §1.1).
        return self.prefix + event.data + b"}"


def make_subscription(name: str, ref: StreamRef, source: Source) -> Subscription:
    """A subscription that starts with the source's next event; `release` it when done."""
    prefix = b'{"stream":"' + name.encode() + b'","data":'
    source.subscribers += 1
    return Subscription(name, prefix, source, ref, source.head)


def release(subscription: Subscription) -> None:
    subscription.source.subscribers -= 1


class Session(Protocol):
    """What the hub needs from a live connection."""

    connection_id: int
    family: PathFamily

    def wake(self) -> None: ...

    def sends_data(self) -> bool: ...

    def push_urgent(self, subscription: Subscription, event: Event) -> None: ...

    def subscriptions(self) -> Iterable[Subscription]: ...

    def abort(self) -> None: ...

    async def close(self, code: int, message: bytes) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def silence(self, seconds: float) -> None: ...

    def shut_down(self, notice_s: float) -> bool: ...

    def refresh_symbols(self) -> None: ...


class Hub:
    """Sources by stream, the symbol universe, the knobs (rate, pause, max events, faults), the ledger."""

    def __init__(
        self,
        *,
        rate: float,
        spot_symbols: Iterable[str],
        futures_symbols: Iterable[str],
        seed: int,
        max_events: int | None,
        recordings: Recordings,
        max_connection_age_s: float = MAX_CONNECTION_AGE_S,
    ) -> None:
        self.seed = seed
        self.max_connection_age_s = max_connection_age_s
        self.rate = rate
        # True: `rate` is the events/s of all connections together, shared evenly by those sending
        # data (a benchmark offers an exact total whatever number of connections the client opens).
        self.rate_is_total = False
        self.paused = False
        self.remaining = max_events  # data frames still allowed; None = no limit
        self.malformed_pending = 0
        self.ledger = Ledger()
        self.recordings = recordings
        self.spot_symbols = _universe(spot_symbols, recordings.symbols("spot"))
        self.futures_symbols = _universe(futures_symbols, recordings.symbols("futures"))
        # The same as sets, for the per-name checks of a subscription (thousands of names at once).
        self.listed: dict[Market, frozenset[str]] = {
            "spot": frozenset(self.spot_symbols),
            "futures": frozenset(self.futures_symbols),
        }
        # Listed once and delisted since: exchangeInfo keeps them with a non-TRADING status.
        self.delisted: dict[Market, tuple[str, ...]] = {"spot": (), "futures": ()}
        self._prices: dict[Market, dict[str, float]] = {m: recordings.prices(m) for m in ("spot", "futures")}
        self.marks = MarkPrices(self.futures_symbols, seed, self._prices["futures"])
        self.force_orders = ForceOrders(self.futures_symbols, self.marks, seed)
        self.sessions: dict[int, Session] = {}
        self._sources: dict[tuple[object, ...], Source] = {}
        self._books: dict[tuple[Market, str], Book] = {}

    # -- sources ---------------------------------------------------------------------------------

    def price(self, market: Market, symbol: str) -> float:
        """The reference price of a symbol: recorded when there is one, else a plausible one."""
        return self._prices[market].get(symbol) or reference_price(symbol, symbol_rng(self.seed, symbol))

    def book(self, market: Market, symbol: str) -> Book:
        """The depth producer of a symbol (recorded replay when recorded), created on first use."""
        key = (market, symbol)
        book = self._books.get(key)
        if book is None:
            recorded = self.recordings.books.get(key)
            if recorded is not None:
                book = DepthReplay(recorded)
            else:
                book = DepthGen(market, symbol, self.seed, self.price(market, symbol))
            self._books[key] = book
        return book

    def source(self, ref: StreamRef) -> Source:
        """The shared source of a valid stream; depth speeds of one symbol share one book."""
        key = (ref.market, ref.kind, ref.symbol, ref.period_ms)
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = self._new_source(ref)
        return source

    def _new_source(self, ref: StreamRef) -> Source:
        symbol = ref.symbol or ""
        if ref.kind == "depth":
            book = self.book(ref.market, symbol)
            return Source(lambda now, paced: book.next(now))
        if ref.kind == "aggTrade":
            recorded = self.recordings.trades.get((ref.market, symbol))
            trades: AggTradeGen | TradeReplay = (
                TradeReplay(ref.market, symbol, recorded)
                if recorded
                else AggTradeGen(ref.market, symbol, self.seed, self.price(ref.market, symbol))
            )
            return Source(lambda now, paced: trades.next(now))
        if ref.kind == "markPrice":
            return Source(lambda now, paced: self.marks.single(symbol, now), ref.period_ms)
        if ref.kind == "markPriceAll":
            return Source(lambda now, paced: self.marks.array(now), ref.period_ms)
        if ref.kind == "forceOrder":
            produce = self.force_orders.next_symbol
            return Source(lambda now, paced: produce(symbol, now, paced), FORCE_SYMBOL_PERIOD_MS)
        return Source(self.force_orders.next_any, FORCE_ALL_PERIOD_MS)

    # -- listings --------------------------------------------------------------------------------

    def list_symbol(self, market: Market, symbol: str) -> bool:
        """Start trading `symbol` now: exchangeInfo shows it TRADING, its streams send; False if it was."""
        if symbol in self.listed[market]:
            return False
        self._set_listed(market, (*self.symbols(market), symbol))
        self.delisted[market] = tuple(s for s in self.delisted[market] if s != symbol)
        if market == "futures":
            self.marks.add(symbol, self.price(market, symbol))
            self.force_orders.set_symbols(self.futures_symbols)
        self._refresh_sessions()
        return True

    def delist_symbol(self, market: Market, symbol: str) -> bool:
        """Stop trading `symbol` now: its streams fall silent (still subscribed, as on Binance),
        exchangeInfo shows it BREAK (spot) or SETTLING (futures), REST calls answer -1121."""
        if symbol not in self.listed[market]:
            return False
        self._set_listed(market, tuple(s for s in self.symbols(market) if s != symbol))
        self.delisted[market] = (*self.delisted[market], symbol)
        if market == "futures":
            self.force_orders.set_symbols(self.futures_symbols)
        self._refresh_sessions()
        return True

    def symbols(self, market: Market) -> tuple[str, ...]:
        return self.spot_symbols if market == "spot" else self.futures_symbols

    def _set_listed(self, market: Market, symbols: tuple[str, ...]) -> None:
        if market == "spot":
            self.spot_symbols = symbols
        else:
            self.futures_symbols = symbols
        self.listed[market] = frozenset(symbols)

    def _refresh_sessions(self) -> None:
        for session in self.sessions.values():
            session.refresh_symbols()

    # -- knobs -----------------------------------------------------------------------------------

    def connection_rate(self) -> float:
        """The data events/s one connection sends now: `rate`, or its share of a total rate."""
        if not self.rate_is_total:
            return self.rate
        senders = sum(1 for session in self.sessions.values() if session.sends_data())
        return connection_share(self.rate, senders)

    def reserve(self, wanted: int) -> int:
        """How many of `wanted` data frames may still be sent (max_events); reserves them."""
        if self.remaining is None:
            return wanted
        granted = min(wanted, self.remaining)
        self.remaining -= granted
        return granted

    def refund(self, unused: int) -> None:
        if self.remaining is not None:
            self.remaining += unused

    def take_malformed(self) -> bool:
        """True if the next frame must be malformed (and count it as such)."""
        if self.malformed_pending <= 0:
            return False
        self.malformed_pending -= 1
        return True

    def wake_all(self) -> None:
        for session in self.sessions.values():
            session.wake()

    def withhold_depth(self, market: Market, symbol: str, count: int) -> None:
        """Produce the next `count` diff-depth events of a symbol on no connection; the ledger lists them."""
        self.source(StreamRef(market, "depth", symbol)).withhold(count, self._record_withheld)

    def _record_withheld(self, event: Event) -> None:
        self.ledger.withheld.append(depth_identity(event))

    def inject_liquidation(self, symbol: str, side: str, price: str, quantity: str) -> Event:
        """A USD-M liquidation pushed at once to every matching forceOrder subscription."""
        event = self.force_orders.make(symbol, side, price, quantity, now_ms())
        for session in self.sessions.values():
            for sub in session.subscriptions():
                ref = sub.ref
                if ref.kind == "forceOrderAll" or (ref.kind == "forceOrder" and ref.symbol == symbol):
                    session.push_urgent(sub, event)
        return event


def connection_share(total_rate: float, senders: int) -> float:
    """One connection's events/s when `senders` connections share `total_rate` (0 stays full speed)."""
    return total_rate / max(1, senders)


def _universe(configured: Iterable[str], recorded: Iterable[str]) -> tuple[str, ...]:
    """Configured symbols (upper case, in order) followed by the recorded ones."""
    symbols: dict[str, None] = {}
    for symbol in (*configured, *recorded):
        if symbol.strip():
            symbols[symbol.strip().upper()] = None
    return tuple(symbols)
