"""Recorded real Binance frames (cryptofeed sample data) and their endless, still-valid replay.

Loading is the only I/O here. A replay loops over the recorded `data` payloads forever: each loop
shifts every id by the loop's span, so ids never repeat and the depth chains stay valid across the
seam (spot `U == prev u + 1`, futures `pu == prev u`, binance.md §5.3); times are re-based on the
clock the caller passes, keeping each recorded `E - T` gap. Futures payloads gain the post-2026
fields (`st`, aggTrade `nq`, depth `ps`) so they look like today's exchange (binance.md §3).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.fake.generators import AGG_TRADES, DEPTH_UPDATES, Event, Market

logger = logging.getLogger(__name__)

# Package data (pyproject.toml), so an installed collector and its Docker image have them too.
DEFAULT_RECORDINGS_DIR = Path(__file__).resolve().parent / "data" / "cryptofeed"
WS_FILES: dict[Market, str] = {"spot": "BINANCE.ws.1.0", "futures": "BINANCE_FUTURES.ws.1.0"}
HTTP_FILES: dict[Market, str] = {"spot": "BINANCE.http.0.0", "futures": "BINANCE_FUTURES.http.0.0"}


@dataclass(frozen=True)
class RecordedBook:
    """A recorded depth snapshot and the recorded diffs from the first one that applies to it."""

    market: Market
    symbol: str
    last_update_id: int
    bids: tuple[tuple[str, str], ...]
    asks: tuple[tuple[str, str], ...]
    events: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Recordings:
    """Everything the fake replays, keyed by (market, SYMBOL)."""

    books: dict[tuple[Market, str], RecordedBook] = field(default_factory=dict)
    trades: dict[tuple[Market, str], tuple[dict[str, Any], ...]] = field(default_factory=dict)

    def symbols(self, market: Market) -> tuple[str, ...]:
        """Recorded symbols of a market, in a stable order."""
        found = {s for m, s in (*self.books, *self.trades) if m == market}
        return tuple(sorted(found))

    def prices(self, market: Market) -> dict[str, float]:
        """A recorded price per symbol (the snapshot's best bid), to keep generated data plausible."""
        return {s: float(book.bids[0][0]) for (m, s), book in self.books.items() if m == market and book.bids}


def parse_ws_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Combined-stream frames of a `*.ws.*` file (first line is the URL; then `<ts>: <frame>`)."""
    frames: list[dict[str, Any]] = []
    for number, line in enumerate(lines):
        if number == 0 or not line.strip():
            continue
        _, _, body = line.partition(": ")
        frames.append(json.loads(body))
    return frames


def parse_http_lines(lines: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Depth snapshots of a `*.http.*` file by symbol (`<url> -> <ts>: <body>`)."""
    snapshots: dict[str, dict[str, Any]] = {}
    for line in lines:
        if not line.strip():
            continue
        url, _, rest = line.partition(" -> ")
        _, _, body = rest.partition(": ")
        query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
        snapshots[query["symbol"]] = json.loads(body)
    return snapshots


def first_applicable(market: Market, last_update_id: int, events: list[dict[str, Any]]) -> int | None:
    """Index of the first diff that applies to a snapshot (binance.md §5.3), or None."""
    for index, event in enumerate(events):
        target = last_update_id + 1 if market == "spot" else last_update_id
        if event["U"] <= target <= event["u"]:
            return index
    return None


def load_recordings(folder: Path | None = None) -> Recordings:
    """Read the recorded frames and snapshots; a missing folder gives empty recordings."""
    folder = DEFAULT_RECORDINGS_DIR if folder is None else folder
    books: dict[tuple[Market, str], RecordedBook] = {}
    trades: dict[tuple[Market, str], tuple[dict[str, Any], ...]] = {}
    markets: tuple[Market, ...] = ("spot", "futures")
    for market in markets:
        ws_path, http_path = folder / WS_FILES[market], folder / HTTP_FILES[market]
        if not ws_path.is_file() or not http_path.is_file():
            logger.warning("fake.recordings_missing market=%s folder=%s", market, folder)
            continue
        frames = parse_ws_lines(ws_path.read_text().splitlines())
        snapshots = parse_http_lines(http_path.read_text().splitlines())
        diffs: dict[str, list[dict[str, Any]]] = {}
        agg: dict[str, list[dict[str, Any]]] = {}
        for frame in frames:
            data = frame["data"]
            if data.get("e") == "depthUpdate":
                diffs.setdefault(data["s"], []).append(data)
            elif data.get("e") == "aggTrade":
                agg.setdefault(data["s"], []).append(data)
        for symbol, events in diffs.items():
            snapshot = snapshots.get(symbol)
            start = None if snapshot is None else first_applicable(market, snapshot["lastUpdateId"], events)
            if snapshot is None or start is None:
                continue
            books[(market, symbol)] = RecordedBook(
                market,
                symbol,
                snapshot["lastUpdateId"],
                tuple((p, q) for p, q in snapshot["bids"]),
                tuple((p, q) for p, q in snapshot["asks"]),
                tuple(events[start:]),
            )
        for symbol, events in agg.items():
            trades[(market, symbol)] = tuple(events)
    return Recordings(books, trades)


def _json(value: object) -> bytes:
    # `%` would be read as a format directive by the templates below.
    return json.dumps(value, separators=(",", ":")).encode().replace(b"%", b"%%")


class DepthReplay:
    """Endless replay of one recorded book's diffs, and REST snapshots consistent with it."""

    def __init__(self, book: RecordedBook) -> None:
        self._book = book
        self._market = book.market
        self._symbol = book.symbol
        events = book.events
        sym = book.symbol.encode()
        self._templates: list[bytes] = []
        for event in events:
            levels = b'"b":' + _json(event["b"]) + b',"a":' + _json(event["a"])
            if book.market == "spot":
                tpl = b'{"e":"depthUpdate","E":%d,"s":"' + sym + b'","U":%d,"u":%d,' + levels + b"}"
            else:
                tpl = (
                    b'{"e":"depthUpdate","E":%d,"T":%d,"s":"'
                    + sym
                    + b'","U":%d,"u":%d,"pu":%d,'
                    + levels
                    + b',"ps":"'
                    + sym
                    + b'","st":1}'
                )
            self._templates.append(tpl)
        self._first: list[int] = [e["U"] for e in events]
        self._last: list[int] = [e["u"] for e in events]
        self._prev: list[int] = [e.get("pu", 0) for e in events]
        self._lags = [max(e["E"] - e.get("T", e["E"]), 0) for e in events]
        # Shift per loop: spot chains need the next loop's first U == last u + 1; futures need the
        # next loop's first pu == last u.
        if book.market == "spot":
            self._span = self._last[-1] - self._first[0] + 1
        else:
            self._span = self._last[-1] - self._prev[0]
        self._loop = 0
        self._pos = 0
        self._after_one_loop: dict[str, dict[str, str]] | None = None

    @property
    def last_update_id(self) -> int:
        if self._pos == 0:
            if self._loop == 0:
                return self._book.last_update_id
            return self._last[-1] + (self._loop - 1) * self._span
        return self._last[self._pos - 1] + self._loop * self._span

    def next(self, now_ms: int) -> Event:
        i = self._pos
        shift = self._loop * self._span
        last = self._last[i] + shift
        if self._market == "spot":
            data = self._templates[i] % (now_ms, self._first[i] + shift, last)
        else:
            data = self._templates[i] % (
                now_ms,
                now_ms - self._lags[i],
                self._first[i] + shift,
                last,
                self._prev[i] + shift,
            )
        self._pos += 1
        if self._pos == len(self._templates):
            self._pos = 0
            self._loop += 1
        return Event(data, DEPTH_UPDATES, (self._market, self._symbol, last, now_ms))

    def snapshot(self, limit: int) -> tuple[int, list[list[str]], list[list[str]]]:
        """(lastUpdateId, bids best first, asks best first) after every diff produced so far.

        Quantities are absolute, so from the second loop on the book is "snapshot + one full loop +
        this loop's diffs so far": computed in one pass over at most two loops of diffs.
        """
        if self._loop == 0:
            book = self._start()
        else:
            if self._after_one_loop is None:
                self._after_one_loop = self._start()
                self._apply(self._after_one_loop, len(self._templates))
            book = {side: dict(levels) for side, levels in self._after_one_loop.items()}
        self._apply(book, self._pos)
        bids = sorted(book["b"].items(), key=lambda level: -float(level[0]))[:limit]
        asks = sorted(book["a"].items(), key=lambda level: float(level[0]))[:limit]
        return self.last_update_id, [list(level) for level in bids], [list(level) for level in asks]

    def _start(self) -> dict[str, dict[str, str]]:
        return {"b": dict(self._book.bids), "a": dict(self._book.asks)}

    def _apply(self, book: dict[str, dict[str, str]], count: int) -> None:
        for event in self._book.events[:count]:
            for side in ("b", "a"):
                levels = book[side]
                for price, qty in event[side]:
                    if float(qty) == 0.0:
                        levels.pop(price, None)
                    else:
                        levels[price] = qty


class TradeReplay:
    """Endless replay of one symbol's recorded aggTrades with `a`, `f`, `l` shifted each loop."""

    def __init__(self, market: Market, symbol: str, trades: tuple[dict[str, Any], ...]) -> None:
        self._market = market
        self._symbol = symbol
        sym = symbol.encode()
        self._templates: list[bytes] = []
        for trade in trades:
            p, q = _json(trade["p"]), _json(trade["q"])
            maker = b"true" if trade["m"] else b"false"
            if market == "spot":
                tpl = (
                    b'{"e":"aggTrade","E":%d,"s":"' + sym + b'","a":%d,"p":' + p + b',"q":' + q
                    + b',"f":%d,"l":%d,"T":%d,"m":' + maker + b',"M":true}'
                )  # fmt: skip
            else:
                tpl = (
                    b'{"e":"aggTrade","E":%d,"s":"' + sym + b'","a":%d,"p":' + p + b',"q":' + q
                    + b',"nq":' + q + b',"f":%d,"l":%d,"T":%d,"m":' + maker + b',"st":1}'
                )  # fmt: skip
            self._templates.append(tpl)
        self._a = [t["a"] for t in trades]
        self._f = [t["f"] for t in trades]
        self._l = [t["l"] for t in trades]
        self._lags = [max(t["E"] - t["T"], 0) for t in trades]
        self._a_span = self._a[-1] - self._a[0] + 1
        self._f_span = self._l[-1] - self._f[0] + 1
        self._loop = 0
        self._pos = 0

    def next(self, now_ms: int) -> Event:
        i = self._pos
        a = self._a[i] + self._loop * self._a_span
        f_shift = self._loop * self._f_span
        trade_time = now_ms - self._lags[i]
        data = self._templates[i] % (now_ms, a, self._f[i] + f_shift, self._l[i] + f_shift, trade_time)
        self._pos += 1
        if self._pos == len(self._templates):
            self._pos = 0
            self._loop += 1
        return Event(data, AGG_TRADES, (self._market, self._symbol, a, trade_time))
