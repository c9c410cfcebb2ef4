"""Synthetic market events for the fake exchange, serialised once, with the natural key of each.

Pure and deterministic for a seed: no I/O, no clock (callers pass `now_ms`). Payload formats follow
binance.md §3; futures payloads carry the post-2026 fields (`st`, aggTrade `nq`, markPrice `ap`).
Every random choice comes from tables drawn once per market and seed (shared by all symbols, each
from its own offset), so the per-event work is about one bytes `%` format: the fake must push far
more frames per second than the collector can take.
"""

from __future__ import annotations

import functools
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Market = Literal["spot", "futures"]

AGG_TRADES = "agg_trades"
DEPTH_UPDATES = "depth_updates"
MARK_PRICES = "mark_prices"
FORCE_ORDERS = "force_orders"
TABLES = (AGG_TRADES, DEPTH_UPDATES, MARK_PRICES, FORCE_ORDERS)

# COIN-M rows ride on the USD-M all-market streams since 2026-06-30 (binance.md §0 fact 10, §3.6).
COIN_M_SYMBOLS = ("BTCUSD_PERP", "ETHUSD_PERP")
# Rows of a contract with no funding scheduled carry `T:0`, `r:"0.00000000"` (binance.md §3.6).
DELISTED_SYMBOL = "SRMUSDT"
FUNDING_INTERVAL_MS = 8 * 3600 * 1000  # funding at 00:00, 08:00, 16:00 UTC
# Only the latest liquidation per symbol per 1000 ms is pushed (binance.md §3.7).
FORCE_ORDER_MIN_GAP_MS = 1000
TABLE_SIZE = 4096  # length of every pre-drawn random table (a power of two, indexed with a mask)
_MASK = TABLE_SIZE - 1

KNOWN_PRICES = {"BTC": 60000.0, "ETH": 3000.0, "BNB": 600.0, "SOL": 150.0, "XRP": 0.6}
# Quote assets of made-up symbols, in turn, so a quote-asset filter has something to choose from.
SYNTHETIC_QUOTES: dict[Market, tuple[str, ...]] = {"spot": ("USDT", "FDUSD"), "futures": ("USDT", "USDC")}
SYNTHETIC_MAX = 26**3


@dataclass(slots=True)
class Event:
    """One data event: its serialised payload and the natural key(s) the ledger records for it.

    `key` is (market, symbol, a, T) for agg_trades, (market, symbol, u, E) for depth_updates and
    (s, S, T, p, q) for force_orders (None for a COIN-M liquidation); mark price events carry
    their USD-M rows' (s, E) in `rows` instead. `coin_m` counts COIN-M rows or objects.
    """

    data: bytes
    table: str
    key: tuple[Any, ...] | None = None
    rows: tuple[tuple[str, int], ...] = ()
    coin_m: int = 0
    sent: bool = field(default=False)


def symbol_rng(seed: int, *parts: str) -> random.Random:
    """A random generator that depends only on the seed and the names (stable across runs)."""
    return random.Random(seed * 1_000_003 + zlib.crc32("|".join(parts).encode()))


def synthetic_symbols(market: Market, count: int) -> tuple[str, ...]:
    """`count` made-up symbols for runs with many of them: Z + three letters + a quote asset in turn
    (spot ZAAAUSDT, ZAABFDUSD, ...; USD-M ZAAAUSDT, ZAABUSDC, ...). No real symbol starts so."""
    if not 0 <= count <= SYNTHETIC_MAX:
        raise ValueError(f"between 0 and {SYNTHETIC_MAX} made-up symbols")
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    quotes = SYNTHETIC_QUOTES[market]
    names = []
    for index in range(count):
        first, rest = divmod(index, 26 * 26)
        second, third = divmod(rest, 26)
        names.append(f"Z{letters[first]}{letters[second]}{letters[third]}{quotes[index % len(quotes)]}")
    return tuple(names)


def reference_price(symbol: str, rng: random.Random) -> float:
    """A plausible price for a symbol: known bases get their rough level, others a random one."""
    for base, price in KNOWN_PRICES.items():
        if symbol.startswith(base):
            return price
    return round(rng.uniform(0.05, 80.0), 4)


def tick_decimals(price: float) -> int:
    """Decimals of the price tick for a price level (about five significant digits)."""
    for decimals, floor in ((1, 10000.0), (2, 100.0), (3, 10.0), (4, 1.0), (5, 0.1)):
        if price >= floor:
            return decimals
    return 6


def format_ticks(ticks: int, decimals: int, width: int) -> str:
    """`ticks` units of 10**-decimals as a decimal string with `width` decimals."""
    digits = str(ticks).rjust(decimals + 1, "0")
    return f"{digits[:-decimals]}.{digits[-decimals:]}{'0' * (width - decimals)}"


def _quantities(rng: random.Random, decimals: int) -> list[str]:
    # Never "0.000": in a depth diff a zero quantity removes the level.
    smallest = 10.0**-decimals
    return [f"{max(rng.lognormvariate(0.0, 1.2), smallest):.{decimals}f}" for _ in range(TABLE_SIZE)]


@dataclass(frozen=True)
class _TradeTables:
    steps: list[int]  # price random-walk steps, in ticks
    qty: list[bytes]
    fills: list[int]  # trades per aggregate
    lags: list[int]  # E - T, ms
    maker: list[bytes]


@dataclass(frozen=True)
class _DepthTables:
    qty: list[str]  # index 0 is the zero quantity that removes a level
    qty_bytes: list[bytes]
    changes: list[list[tuple[bool, int, int]]]  # per event: (is_bid, level, qty index)
    extra_ids: list[int]  # update ids per event beyond one per change
    gaps: list[int]  # futures: ids skipped between events (pu < U - 1 is normal)
    lags: list[int]  # futures: E - T, ms


@functools.lru_cache(maxsize=8)
def _trade_tables(market: Market, seed: int) -> _TradeTables:
    """Random tables shared by every symbol of a market (drawing them per symbol costs ~5 ms)."""
    rng = symbol_rng(seed, market, "aggTrade tables")
    return _TradeTables(
        steps=[rng.choice((-2, -1, -1, 0, 1, 1, 2)) for _ in range(TABLE_SIZE)],
        qty=[q.encode() for q in _quantities(rng, 8 if market == "spot" else 3)],
        fills=[rng.choice((1, 1, 1, 2, 3, 5)) for _ in range(TABLE_SIZE)],
        lags=[rng.choice((0, 0, 1, 2, 5)) for _ in range(TABLE_SIZE)],
        maker=[b"true" if rng.random() < 0.5 else b"false" for _ in range(TABLE_SIZE)],
    )


@functools.lru_cache(maxsize=8)
def _depth_tables(market: Market, seed: int) -> _DepthTables:
    """Random tables shared by every symbol of a market (drawing them per symbol costs ~12 ms)."""
    rng = symbol_rng(seed, market, "depth tables")
    qty = _quantities(rng, 8 if market == "spot" else 3)
    qty[0] = "0.00000000" if market == "spot" else "0.000"
    top = DepthGen.LEVELS - 1
    # Each event changes 1-3 levels, mostly near the top of the book.
    changes = [
        [
            (rng.random() < 0.5, min(int(rng.expovariate(0.08)), top), rng.randrange(TABLE_SIZE))
            for _ in range(rng.choice((1, 1, 2, 3)))
        ]
        for _ in range(TABLE_SIZE)
    ]
    return _DepthTables(
        qty=qty,
        qty_bytes=[q.encode() for q in qty],
        changes=changes,
        extra_ids=[rng.choice((0, 0, 1, 2, 4)) for _ in range(TABLE_SIZE)],
        gaps=[rng.choice((0, 3, 8, 20)) for _ in range(TABLE_SIZE)],
        lags=[rng.choice((1, 2, 3, 5, 8)) for _ in range(TABLE_SIZE)],
    )


class AggTradeGen:
    """aggTrade events for one symbol: increasing `a`, `f`..`l`, a bounded price random walk, `T` <= `E`."""

    def __init__(self, market: Market, symbol: str, seed: int, price: float | None = None) -> None:
        rng = symbol_rng(seed, market, symbol, "aggTrade")
        price = price or reference_price(symbol, rng)
        self._decimals = tick_decimals(price)
        self._width = 8 if market == "spot" else self._decimals  # spot prints 8 decimals (binance.md §3.1)
        self._centre = int(price * 10**self._decimals)
        self._band = max(self._centre // 50, 10)  # keep the walk within about 2 % of the reference
        self._ticks = self._centre
        tables = _trade_tables(market, seed)
        self._steps, self._qty, self._fills = tables.steps, tables.qty, tables.fills
        self._lags, self._maker = tables.lags, tables.maker
        self._a = rng.randrange(10**8, 10**9)
        self._f = self._a * 3
        self._last_t = 0
        self._i = rng.randrange(TABLE_SIZE)  # symbols share the tables from different offsets
        self._market = market
        self._symbol = symbol
        sym = symbol.encode()
        if market == "spot":
            self._template = (
                b'{"e":"aggTrade","E":%d,"s":"' + sym + b'","a":%d,"p":"%s","q":"%s","f":%d,"l":%d,'
                b'"T":%d,"m":%s,"M":true}'
            )
        else:
            self._template = (
                b'{"e":"aggTrade","E":%d,"s":"' + sym + b'","a":%d,"p":"%s","q":"%s","nq":"%s",'
                b'"f":%d,"l":%d,"T":%d,"m":%s,"st":1}'
            )

    def next(self, now_ms: int) -> Event:
        i = self._i & _MASK
        self._i += 1
        drift = self._ticks - self._centre
        step = self._steps[i]
        self._ticks += -abs(step) if drift > self._band else abs(step) if drift < -self._band else step
        price = format_ticks(self._ticks, self._decimals, self._width).encode()
        qty = self._qty[i]
        a, f = self._a, self._f
        last = f + self._fills[i] - 1
        self._a, self._f = a + 1, last + 1
        trade_time = max(self._last_t, now_ms - self._lags[i])
        self._last_t = trade_time = min(trade_time, now_ms)
        if self._market == "spot":
            data = self._template % (now_ms, a, price, qty, f, last, trade_time, self._maker[i])
        else:
            data = self._template % (now_ms, a, price, qty, qty, f, last, trade_time, self._maker[i])
        return Event(data, AGG_TRADES, (self._market, self._symbol, a, trade_time))


class DepthGen:
    """Diff-depth events for one symbol over a fixed price grid, with valid update-id chains.

    Spot events chain `U == prev u + 1`; futures events skip ids (`U > pu + 1` is normal) and chain
    `pu == prev u` (binance.md §5.3). The book the events build is kept, so a REST snapshot taken at
    any moment matches the stream: its `lastUpdateId` is the `u` of the last event produced.
    """

    LEVELS = 200  # price levels per side on the grid

    def __init__(self, market: Market, symbol: str, seed: int, price: float | None = None) -> None:
        rng = symbol_rng(seed, market, symbol, "depth")
        price = price or reference_price(symbol, rng)
        decimals = tick_decimals(price)
        width = 8 if market == "spot" else decimals
        centre = int(price * 10**decimals)
        self._market = market
        self._symbol = symbol
        self._bid_prices = [format_ticks(centre - k, decimals, width) for k in range(1, self.LEVELS + 1)]
        self._ask_prices = [format_ticks(centre + k, decimals, width) for k in range(1, self.LEVELS + 1)]
        # Pre-serialised `["price","%s"]` per level: one `%` per change.
        self._bid_levels = [b'["%s","%%s"]' % p.encode() for p in self._bid_prices]
        self._ask_levels = [b'["%s","%%s"]' % p.encode() for p in self._ask_prices]
        tables = _depth_tables(market, seed)
        self._qty, self._qty_bytes, self._changes = tables.qty, tables.qty_bytes, tables.changes
        self._extra_ids, self._gaps, self._lags = tables.extra_ids, tables.gaps, tables.lags
        self._bids = [rng.randrange(1, TABLE_SIZE) for _ in range(self.LEVELS)]
        self._asks = [rng.randrange(1, TABLE_SIZE) for _ in range(self.LEVELS)]
        self._u = rng.randrange(10**9, 10**10) if market == "spot" else rng.randrange(10**11, 10**12)
        self._i = rng.randrange(TABLE_SIZE)  # symbols share the tables from different offsets
        sym = symbol.encode()
        if market == "spot":
            self._template = b'{"e":"depthUpdate","E":%d,"s":"' + sym + b'","U":%d,"u":%d,"b":[%s],"a":[%s]}'
        else:
            self._template = (
                b'{"e":"depthUpdate","E":%d,"T":%d,"s":"' + sym + b'","U":%d,"u":%d,"pu":%d,'
                b'"b":[%s],"a":[%s],"ps":"' + sym + b'","st":1}'
            )

    @property
    def last_update_id(self) -> int:
        return self._u

    def next(self, now_ms: int) -> Event:
        i = self._i & _MASK
        self._i += 1
        bids: list[bytes] = []
        asks: list[bytes] = []
        for is_bid, level, qty in self._changes[i]:
            if is_bid:
                self._bids[level] = qty
                bids.append(self._bid_levels[level] % self._qty_bytes[qty])
            else:
                self._asks[level] = qty
                asks.append(self._ask_levels[level] % self._qty_bytes[qty])
        prev = self._u
        if self._market == "spot":
            first = prev + 1
            self._u = last = first + len(bids) + len(asks) - 1 + self._extra_ids[i]
            data = self._template % (now_ms, first, last, b",".join(bids), b",".join(asks))
        else:
            first = prev + 1 + self._gaps[i]
            self._u = last = first + len(bids) + len(asks) + self._extra_ids[i]
            tx_time = now_ms - self._lags[i]
            data = self._template % (now_ms, tx_time, first, last, prev, b",".join(bids), b",".join(asks))
        return Event(data, DEPTH_UPDATES, (self._market, self._symbol, last, now_ms))

    def snapshot(self, limit: int) -> tuple[int, list[list[str]], list[list[str]]]:
        """(lastUpdateId, bids best first, asks best first) of the book the events have built."""
        bids = [[p, self._qty[q]] for p, q in zip(self._bid_prices, self._bids, strict=True) if q][:limit]
        asks = [[p, self._qty[q]] for p, q in zip(self._ask_prices, self._asks, strict=True) if q][:limit]
        return self._u, bids, asks


MARK_WALK = 256  # mark prices drawn per contract; replayed forwards then backwards, endlessly


class _Mark:
    """One contract's pre-serialised mark-price rows (a bounded walk) and its event-time clock."""

    __slots__ = ("funded", "i", "last_e", "prices", "st", "templates")

    def __init__(self, symbol: str, price: float, st: int, rate: str, rng: random.Random) -> None:
        self.st = st
        self.funded = symbol != DELISTED_SYMBOL
        self.last_e = 0
        self.i = 0
        self.prices: list[float] = []
        for _ in range(MARK_WALK):
            price *= 1.0 + rng.gauss(0.0, 0.0002)
            self.prices.append(price)
        self.prices += self.prices[-2:0:-1]  # back again, so the cycle has no jump
        sym = symbol.encode()
        self.templates = [
            (
                b'{"e":"markPriceUpdate","E":%%d,"s":"%s","p":"%.8f","ap":"%.8f","i":"%.8f","P":"%.8f",'
                b'"r":"%s","T":%%d,"st":%d}'
            )
            % (sym, p, p, p * 0.9998, p * 1.0001, rate.encode(), st)
            for p in self.prices
        ]

    def row(self, now_ms: int) -> tuple[bytes, int]:
        """The next row, with `E` strictly above the previous one (so [s, E] is unique)."""
        self.i = i = (self.i + 1) % len(self.templates)
        self.last_e = event_time = max(now_ms, self.last_e + 1)
        next_funding = (event_time // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS if self.funded else 0
        return self.templates[i] % (event_time, next_funding), event_time


class MarkPrices:
    """Mark prices of every futures contract, COIN-M and one delisted contract included."""

    def __init__(
        self, futures_symbols: Sequence[str], seed: int, prices: Mapping[str, float] | None = None
    ) -> None:
        rng = symbol_rng(seed, "markPrice")
        prices = prices or {}
        self._seed = seed
        self._marks: dict[str, _Mark] = {}
        for symbol in (*futures_symbols, DELISTED_SYMBOL):
            funded = symbol != DELISTED_SYMBOL
            rate = f"{rng.uniform(-0.0002, 0.0005):.8f}" if funded else "0.00000000"
            price = prices.get(symbol) or reference_price(symbol, symbol_rng(seed, symbol))
            self._marks[symbol] = _Mark(symbol, price, 1, rate, rng)
        for symbol in COIN_M_SYMBOLS:
            rate = f"{rng.uniform(0, 0.0003):.8f}"
            self._marks[symbol] = _Mark(symbol, reference_price(symbol, rng), 2, rate, rng)

    def add(self, symbol: str, price: float) -> None:
        """A contract listed while running: its rows join `!markPrice@arr`, `<symbol>@markPrice` works."""
        if symbol not in self._marks:
            rng = symbol_rng(self._seed, "markPrice", symbol)
            self._marks[symbol] = _Mark(symbol, price, 1, f"{rng.uniform(-0.0002, 0.0005):.8f}", rng)

    def price(self, symbol: str) -> float:
        mark = self._marks.get(symbol)
        return mark.prices[mark.i] if mark is not None else 1.0

    def single(self, symbol: str, now_ms: int) -> Event:
        """A `<symbol>@markPrice` event."""
        row, event_time = self._marks[symbol].row(now_ms)
        return Event(row, MARK_PRICES, rows=((symbol, event_time),))

    def array(self, now_ms: int) -> Event:
        """A `!markPrice@arr` event: a JSON array with every contract, COIN-M rows included."""
        rows: list[bytes] = []
        keys: list[tuple[str, int]] = []
        coin_m = 0
        for symbol, mark in self._marks.items():
            row, event_time = mark.row(now_ms)
            rows.append(row)
            if mark.st == 1:
                keys.append((symbol, event_time))
            else:
                coin_m += 1
        return Event(b"[" + b",".join(rows) + b"]", MARK_PRICES, rows=tuple(keys), coin_m=coin_m)


class ForceOrders:
    """Liquidation snapshots: one object per event; about one in ten is COIN-M (`st:2`)."""

    COIN_M_SHARE = 0.1

    def __init__(self, futures_symbols: Sequence[str], marks: MarkPrices, seed: int) -> None:
        rng = symbol_rng(seed, "forceOrder")
        self._symbols = tuple(futures_symbols)
        self._marks = marks
        self._coin_m = [rng.random() < self.COIN_M_SHARE for _ in range(TABLE_SIZE)]
        self._picks = [rng.randrange(1 << 30) for _ in range(TABLE_SIZE)]
        self._sides = [rng.choice(("SELL", "BUY")) for _ in range(TABLE_SIZE)]
        self._qty = _quantities(rng, 3)
        self._slips = [rng.uniform(-0.003, 0.003) for _ in range(TABLE_SIZE)]
        self._last_t: dict[str, int] = {}
        self._i = 0

    def set_symbols(self, futures_symbols: Sequence[str]) -> None:
        """The USD-M symbols liquidations are drawn from (listings and delistings change them)."""
        self._symbols = tuple(futures_symbols)

    def next_any(self, now_ms: int, paced: bool) -> Event | None:
        """A liquidation on any symbol, or None when every candidate is within its 1000 ms window."""
        i = self._i & _MASK
        self._i += 1
        pool = COIN_M_SYMBOLS if self._coin_m[i] else self._symbols
        start = self._picks[i]
        for k in range(len(pool)):
            symbol = pool[(start + k) % len(pool)]
            if not paced or now_ms - self._last_t.get(symbol, 0) >= FORCE_ORDER_MIN_GAP_MS:
                return self._generated(symbol, i, now_ms)
        return None

    def next_symbol(self, symbol: str, now_ms: int, paced: bool) -> Event | None:
        """A liquidation on one symbol, or None within its 1000 ms window."""
        i = self._i & _MASK
        self._i += 1
        if paced and now_ms - self._last_t.get(symbol, 0) < FORCE_ORDER_MIN_GAP_MS:
            return None
        return self._generated(symbol, i, now_ms)

    def _generated(self, symbol: str, i: int, now_ms: int) -> Event:
        price = self._marks.price(symbol) * (1.0 + self._slips[i])
        decimals = tick_decimals(price)
        return self.make(symbol, self._sides[i], f"{price:.{decimals}f}", self._qty[i], now_ms)

    def make(self, symbol: str, side: str, price: str, quantity: str, now_ms: int) -> Event:
        """A FILLED IOC liquidation order; `o.T` strictly increases per symbol so the key is unique."""
        self._last_t[symbol] = trade_time = max(now_ms, self._last_t.get(symbol, 0) + 1)
        coin_m = symbol in COIN_M_SYMBOLS
        pair = symbol.split("_")[0] if coin_m else symbol
        data = (
            b'{"e":"forceOrder","E":%d,"ps":"%s","st":%d,"o":{"s":"%s","S":"%s","o":"LIMIT","f":"IOC",'
            b'"q":"%s","p":"%s","ap":"%s","X":"FILLED","l":"%s","z":"%s","T":%d}}'
            % (
                trade_time,
                pair.encode(),
                2 if coin_m else 1,
                symbol.encode(),
                side.encode(),
                quantity.encode(),
                price.encode(),
                price.encode(),
                quantity.encode(),
                quantity.encode(),
                trade_time,
            )
        )
        if coin_m:
            return Event(data, FORCE_ORDERS, None, coin_m=1)
        return Event(data, FORCE_ORDERS, (symbol, side, trade_time, price, quantity))
