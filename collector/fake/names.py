"""Which stream names the fake exchange serves on which path, judged like Binance judges them.

Pure functions. Deliberately independent of `collector.binance.streams`: the fake must reject what the
real exchange rejects, not what the collector believes. Binance acknowledges every SUBSCRIBE, even for
a wrong name or a wrong path, and then sends nothing (binance.md §0 fact 3, §1.2, §1.4); a name this
module rejects is therefore acknowledged and silent, never an error.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

# The connection path a client opened, below the fake's market prefix.
PathFamily = Literal["spot", "public", "market", "legacy"]
Market = Literal["spot", "futures"]
Kind = Literal["aggTrade", "depth", "markPrice", "markPriceAll", "forceOrder", "forceOrderAll"]

# Spot diff depth: `@depth` (1000 ms) and `@depth@100ms` only (binance.md §1.4).
SPOT_DEPTH_SUFFIXES = ("depth", "depth@100ms")
# USD-M diff depth: `@depth` (250 ms), `@depth@500ms`, `@depth@100ms` (binance.md §1.4, §3.4).
FUTURES_DEPTH_SUFFIXES = ("depth", "depth@500ms", "depth@100ms")
# Mark price every 3 s by default, or every 1 s with `@1s` (binance.md §3.5, §3.6).
MARK_PRICE_PERIODS_MS = {"markPrice": 3000, "markPrice@1s": 1000}
PATHS: dict[str, PathFamily] = {
    "/spot/stream": "spot",
    "/futures/public/stream": "public",
    "/futures/market/stream": "market",
    # Retired on 2026-04-23: connections are accepted and stay silent (binance.md §1.2, §7 #1).
    "/futures/stream": "legacy",
}
ALL_MARKET: dict[str, tuple[Kind, int | None]] = {
    "!markPrice@arr": ("markPriceAll", 3000),
    "!markPrice@arr@1s": ("markPriceAll", 1000),
    "!forceOrder@arr": ("forceOrderAll", None),
}


@dataclass(frozen=True)
class StreamRef:
    """What a valid stream name asks for. `symbol` is upper case; None for all-market streams."""

    market: Market
    kind: Kind
    symbol: str | None
    period_ms: int | None = None


def path_family(path: str) -> PathFamily | None:
    """The family of a WebSocket path of the fake (`/spot/stream`, `/futures/public/stream`, ...)."""
    return PATHS.get(path.rstrip("/"))


def parse_stream(
    family: PathFamily,
    name: str,
    spot_symbols: Collection[str],
    futures_symbols: Collection[str],
) -> StreamRef | None:
    """The stream a name denotes on a path, or None when Binance would acknowledge it and stay silent."""
    if family == "spot":
        return _parse_spot(name, spot_symbols)
    if family == "public":
        return _parse_public(name, futures_symbols)
    if family == "market":
        return _parse_market(name, futures_symbols)
    return None


def _split(name: str, symbols: Collection[str]) -> tuple[str, str] | None:
    """(SYMBOL, suffix) for `<symbol>@<suffix>`, only if the symbol is lower case and listed."""
    symbol, sep, suffix = name.partition("@")
    # "All symbols for streams are lowercase" (binance.md §1.4): `BTCUSDT@aggTrade` stays silent.
    if not sep or not symbol or symbol != symbol.lower() or symbol.upper() not in symbols:
        return None
    return symbol.upper(), suffix


def _parse_spot(name: str, symbols: Collection[str]) -> StreamRef | None:
    split = _split(name, symbols)
    if split is None:
        return None
    symbol, suffix = split
    if suffix == "aggTrade":
        return StreamRef("spot", "aggTrade", symbol)
    if suffix in SPOT_DEPTH_SUFFIXES:
        return StreamRef("spot", "depth", symbol)
    return None


def _parse_public(name: str, symbols: Collection[str]) -> StreamRef | None:
    split = _split(name, symbols)
    if split is None:
        return None
    symbol, suffix = split
    if suffix in FUTURES_DEPTH_SUFFIXES:
        return StreamRef("futures", "depth", symbol)
    return None


def _parse_market(name: str, symbols: Collection[str]) -> StreamRef | None:
    if name in ALL_MARKET:
        kind, period_ms = ALL_MARKET[name]
        return StreamRef("futures", kind, None, period_ms)
    split = _split(name, symbols)
    if split is None:
        return None
    symbol, suffix = split
    if suffix == "aggTrade":
        return StreamRef("futures", "aggTrade", symbol)
    if suffix in MARK_PRICE_PERIODS_MS:
        return StreamRef("futures", "markPrice", symbol, MARK_PRICE_PERIODS_MS[suffix])
    if suffix == "forceOrder":
        return StreamRef("futures", "forceOrder", symbol)
    return None
