"""Envelopes shaped like the real ones, for tests and benchmarks that need many distinct events."""

from __future__ import annotations

import orjson

from collector.binance.rows import make_envelope

BASE_MS = 1_764_000_000_000


def agg_trade(i: int, market: str = "futures", symbol: str = "BTCUSDT") -> bytes:
    data = {
        "e": "aggTrade",
        "E": BASE_MS + i,
        "s": symbol,
        "a": 1_000_000 + i,
        "p": f"{65000 + i % 100}.10",
        "q": "0.015",
        "f": 5_000_000 + 2 * i,
        "l": 5_000_001 + 2 * i,
        "T": BASE_MS + i - 1,
        "m": i % 2 == 0,
    }
    if market == "futures":
        data |= {"nq": "0.015", "st": 1}
    else:
        data["M"] = True
    frame = orjson.dumps({"stream": f"{symbol.lower()}@aggTrade", "data": data})
    return make_envelope(market, (BASE_MS + i) * 1000 + 7, frame)


def depth_update(i: int, market: str = "futures", symbol: str = "BTCUSDT") -> bytes:
    data: dict[str, object] = {
        "e": "depthUpdate",
        "E": BASE_MS + i,
        "s": symbol,
        "U": 10 * i + 1,
        "u": 10 * i + 10,
        "b": [["65000.10", "1.5"], ["64999.00", "0"]],
        "a": [["65001.00", "2.25"]],
    }
    if market == "futures":
        data |= {"T": BASE_MS + i - 2, "pu": 10 * i, "st": 1}
    frame = orjson.dumps({"stream": f"{symbol.lower()}@depth@100ms", "data": data})
    return make_envelope(market, (BASE_MS + i) * 1000 + 9, frame)


def mark_price_frame(
    i: int, symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT"), coin_m: tuple[str, ...] = ()
) -> bytes:
    rows = [
        {
            "e": "markPriceUpdate",
            "E": BASE_MS + 1000 * i,
            "s": s,
            "p": "65000.5",
            "ap": "65000.5",
            "i": "64990.1",
            "P": "65001.0",
            "r": "0.00010000",
            "T": BASE_MS + 3_600_000,
            "st": 1,
        }
        for s in symbols
    ]
    rows += [
        {
            "e": "markPriceUpdate",
            "E": BASE_MS + 1000 * i,
            "s": s,
            "p": "65000.5",
            "i": "64990.1",
            "P": "0",
            "r": "0.0001",
            "T": BASE_MS + 3_600_000,
            "st": 2,
        }
        for s in coin_m
    ]
    frame = orjson.dumps({"stream": "!markPrice@arr@1s", "data": rows})
    return make_envelope("futures", (BASE_MS + 1000 * i) * 1000 + 3, frame)


def force_order(
    i: int,
    symbol: str = "BTCUSDT",
    side: str = "SELL",
    price: str = "65000.0",
    qty: str = "0.5",
    st: int | None = 1,
) -> bytes:
    data: dict[str, object] = {
        "e": "forceOrder",
        "E": BASE_MS + 1000 * i,
        "o": {
            "s": symbol,
            "S": side,
            "o": "LIMIT",
            "f": "IOC",
            "q": qty,
            "p": price,
            "ap": price,
            "X": "FILLED",
            "l": qty,
            "z": qty,
            "T": BASE_MS + 1000 * i - 5,
        },
    }
    if st is not None:
        data |= {"ps": symbol, "st": st}
    frame = orjson.dumps({"stream": "!forceOrder@arr", "data": data})
    return make_envelope("futures", (BASE_MS + 1000 * i) * 1000 + 1, frame)


def open_interest(i: int, symbol: str = "BTCUSDT") -> bytes:
    body = orjson.dumps({"openInterest": f"{10000 + i}.509", "symbol": symbol, "time": BASE_MS + 60_000 * i})
    return make_envelope("futures", (BASE_MS + 60_000 * i) * 1000 + 11, body, symbol=symbol)


def depth_snapshot(i: int, market: str = "spot", symbol: str = "BTCUSDT") -> bytes:
    body: dict[str, object] = {"lastUpdateId": 1000 * i, "bids": [["65000.1", "1"]], "asks": [["65001", "2"]]}
    if market == "futures":
        body |= {"E": BASE_MS + i, "T": BASE_MS + i - 1}
    return make_envelope(market, (BASE_MS + 300_000 * i) * 1000 + 13, orjson.dumps(body), symbol=symbol)
