"""Binance stream names, which connection path carries each, and how streams split into connections.

Pure functions only. A wrong stream name is acknowledged by Binance and then stays silent
(binance.md §0 fact 3), so every wire name is built here from a whitelist of configured types.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from collector.settings import Market, Settings

logger = logging.getLogger(__name__)

# USD-M futures split its WebSocket URLs on 2026-03-06 (legacy retired 2026-04-23): depth and book
# tickers on `/public`, aggTrade/markPrice/forceOrder on `/market`. A stream on the wrong path is
# acknowledged and delivers nothing (binance.md §1.2).
Family = Literal["spot", "public", "market"]

MAX_STREAMS_PER_CONNECTION_BINANCE = 1024  # Binance cap; the 1025th kills all of them (binance.md §2)


@dataclass(frozen=True)
class StreamSpec:
    """One wire stream: its exact name, the market, the connection family and the table it feeds."""

    name: str
    market: Market
    family: Family
    table: str


@dataclass(frozen=True)
class ConnectionPlan:
    """One WebSocket connection to hold: a stable id, its URL and the streams it carries."""

    connection_id: str
    market: Market
    family: Family
    url: str
    streams: tuple[str, ...]


def spot_stream_name(symbol: str, stream_type: str) -> str:
    """Wire name of a spot stream for one symbol; symbols must be lower case on the wire."""
    sym = symbol.lower()
    if stream_type == "aggTrade":
        return f"{sym}@aggTrade"
    if stream_type in ("depth", "depth@1000ms"):
        return f"{sym}@depth"
    if stream_type == "depth@100ms":
        return f"{sym}@depth@100ms"
    if stream_type == "depth@500ms":
        # Spot only offers 1000 ms and 100 ms diff depth (binance.md §1.4). 100 ms keeps every
        # instant at least as fine as asked; `@depth@500ms` itself would be acknowledged and silent.
        return f"{sym}@depth@100ms"
    raise ValueError(f"unknown spot stream type {stream_type!r}")


def futures_stream_name(symbol: str | None, stream_type: str) -> str:
    """Wire name of a USD-M stream; all-market types ignore `symbol`."""
    all_market = {
        "markPrice@arr": "!markPrice@arr",
        "markPrice@arr@1s": "!markPrice@arr@1s",
        "forceOrder": "!forceOrder@arr",
    }
    if stream_type in all_market:
        return all_market[stream_type]
    if symbol is None:
        raise ValueError(f"stream type {stream_type!r} needs a symbol")
    sym = symbol.lower()
    per_symbol = {
        "aggTrade": f"{sym}@aggTrade",
        # `@depth@250ms` is acknowledged and silent on partial depth; the bare name is the 250 ms stream.
        "depth": f"{sym}@depth",
        "depth@250ms": f"{sym}@depth",
        "depth@500ms": f"{sym}@depth@500ms",
        "depth@100ms": f"{sym}@depth@100ms",
        "markPrice": f"{sym}@markPrice",
        "markPrice@1s": f"{sym}@markPrice@1s",
        "forceOrder@symbol": f"{sym}@forceOrder",
    }
    if stream_type not in per_symbol:
        raise ValueError(f"unknown futures stream type {stream_type!r}")
    return per_symbol[stream_type]


@lru_cache(maxsize=65536)
def table_for_stream(name: str) -> str | None:
    """The table a wire stream feeds, or None for a stream the collector does not store."""
    if name.endswith("@aggTrade"):
        return "agg_trades"
    if "@depth" in name and not name.split("@depth", 1)[1][:1].isdigit():
        return "depth_updates"  # diff depth only; `@depth5/10/20` partial books are not diffs
    if "markPrice" in name:
        return "mark_prices"
    if "forceOrder" in name:
        return "force_orders"
    return None


def stream_symbol(name: str) -> str | None:
    """The symbol a per-symbol stream follows (`btcusdt@depth@100ms` -> BTCUSDT); None for `!` streams."""
    if name.startswith("!") or "@" not in name:
        return None
    return name.split("@", 1)[0].upper()


def family_for_futures_stream(name: str) -> Family:
    """`/public` carries depth and book tickers; everything else the collector uses is on `/market`."""
    if "@depth" in name or "bookTicker" in name:
        return "public"
    return "market"


def stream_specs(settings: Settings) -> list[StreamSpec]:
    """Every stream the settings ask for, deduplicated, in a stable order."""
    specs: dict[str, StreamSpec] = {}
    for stream_type in settings.spot_streams:
        for symbol in settings.spot_symbols:
            name = spot_stream_name(symbol, stream_type)
            specs.setdefault(f"spot|{name}", StreamSpec(name, "spot", "spot", _table(name)))
    for stream_type in settings.futures_streams:
        symbols: Iterable[str | None] = (
            [None]
            if stream_type in ("markPrice@arr", "markPrice@arr@1s", "forceOrder")
            else settings.futures_symbols
        )
        for futures_symbol in symbols:
            name = futures_stream_name(futures_symbol, stream_type)
            family = family_for_futures_stream(name)
            specs.setdefault(f"futures|{name}", StreamSpec(name, "futures", family, _table(name)))
    return list(specs.values())


def _table(name: str) -> str:
    found = table_for_stream(name)
    if found is None:
        raise ValueError(f"stream {name!r} feeds no table")
    return found


def combined_url(base_url: str, family: Family, streams: Sequence[str]) -> str:
    """URL of a combined-stream connection: spot `/stream?streams=`, futures `/<family>/stream?streams=`."""
    base = base_url.rstrip("/")
    path = "/stream" if family == "spot" else f"/{family}/stream"
    return f"{base}{path}?streams={'/'.join(streams)}"


def connection_plans(settings: Settings) -> list[ConnectionPlan]:
    """Split the streams into connections: one family per connection, at most N streams each."""
    per_connection = min(settings.ws_max_streams_per_connection, MAX_STREAMS_PER_CONNECTION_BINANCE)
    grouped: dict[tuple[Market, Family], list[str]] = {}
    for spec in stream_specs(settings):
        grouped.setdefault((spec.market, spec.family), []).append(spec.name)
    plans: list[ConnectionPlan] = []
    for (market, family), names in grouped.items():
        base = settings.binance_spot_ws_url if market == "spot" else settings.binance_futures_ws_url
        for index in range(0, len(names), per_connection):
            chunk = tuple(names[index : index + per_connection])
            prefix = "spot" if market == "spot" else f"futures-{family}"
            plans.append(
                ConnectionPlan(
                    connection_id=f"{prefix}-{index // per_connection}",
                    market=market,
                    family=family,
                    url=combined_url(base, family, chunk),
                    streams=chunk,
                )
            )
    return plans


def log_stream_substitutions(settings: Settings) -> None:
    """Warn once about configured types that Binance does not offer as written."""
    if "depth@500ms" in settings.spot_streams:
        logger.warning(
            "streams.substituted market=spot configured=depth@500ms used=depth@100ms "
            "reason=spot diff depth exists only at 1000ms and 100ms"
        )
