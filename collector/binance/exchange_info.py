"""exchangeInfo, pure: the request, and which symbols of the answer a market records with `*_SYMBOLS=ALL`.

Spot `GET /api/v3/exchangeInfo` costs 20 weight, USD-M `GET /fapi/v1/exchangeInfo` 1 (binance.md §4.4).
Only the fields used here are read, and unknown keys are ignored (Binance adds fields):

- `symbols[].symbol`     the name, upper case (`BTCUSDT`, a USD-M quarterly `BTCUSDT_261225`)
- `symbols[].status`     spot: TRADING, HALT, BREAK, CANCEL_ONLY (since 2026-07-07); USD-M: TRADING,
                         SETTLING, PENDING_TRADING, ... Only TRADING symbols are recorded: the others
                         send nothing, and a silent stream is worth no alarm.
- `symbols[].quoteAsset` the asset the price is quoted in (`USDT`), for `*_QUOTE_ASSETS`
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import orjson

from collector.binance.rest import Market, RestRequest
from collector.settings import SYMBOL_PATTERN

SPOT_EXCHANGE_INFO_PATH: Final = "/api/v3/exchangeInfo"
FUTURES_EXCHANGE_INFO_PATH: Final = "/fapi/v1/exchangeInfo"
SPOT_EXCHANGE_INFO_WEIGHT: Final = 20  # binance.md §4.4 [S-REST]
FUTURES_EXCHANGE_INFO_WEIGHT: Final = 1  # binance.md §4.4 [SDK], also measured as 1 [OBS]
TRADING: Final = "TRADING"


class ExchangeInfoError(ValueError):
    """An exchangeInfo body that is not what Binance sends (not JSON, or no `symbols` list)."""


@dataclass(frozen=True, slots=True)
class SymbolInfo:
    """One row of `symbols`, reduced to what the symbol universe needs."""

    symbol: str
    status: str
    quote_asset: str


def exchange_info_request(market: Market, base_url: str) -> RestRequest:
    """GET {spot}/api/v3/exchangeInfo or {futures}/fapi/v1/exchangeInfo, every symbol at once.

    Spot is asked for TRADING symbols only (`symbolStatus=TRADING`, binance.md §4.4): its full answer
    carries thousands of retired pairs, several megabytes this process would parse for nothing. The
    status is still checked on every row, so a server that ignores the parameter changes nothing.
    """
    if market == "spot":
        url = base_url.rstrip("/") + SPOT_EXCHANGE_INFO_PATH
        return RestRequest("spot", "exchange_info", url, {"symbolStatus": TRADING}, SPOT_EXCHANGE_INFO_WEIGHT)
    url = base_url.rstrip("/") + FUTURES_EXCHANGE_INFO_PATH
    return RestRequest("futures", "exchange_info", url, {}, FUTURES_EXCHANGE_INFO_WEIGHT)


def parse_exchange_info(body: bytes) -> list[SymbolInfo]:
    """The rows of an exchangeInfo body; rows without a string `symbol` are skipped."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ExchangeInfoError(f"exchangeInfo is not JSON: {error}") from None
    rows = parsed.get("symbols") if isinstance(parsed, dict) else None
    if not isinstance(rows, list):
        raise ExchangeInfoError("exchangeInfo has no `symbols` list")
    infos: list[SymbolInfo] = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        symbol, status, quote = row.get("symbol"), row.get("status"), row.get("quoteAsset")
        if isinstance(symbol, str):
            infos.append(SymbolInfo(symbol, str(status or ""), str(quote or "")))
    return infos


@dataclass(frozen=True)
class Selection:
    """The symbols to record, and what was left out because this collector cannot name its streams."""

    symbols: list[str]
    unnamable: list[str]  # TRADING and quoted as asked, but not a valid stream symbol (e.g. non-ASCII)


def select_symbols(infos: Iterable[SymbolInfo], quote_assets: Sequence[str] = ()) -> Selection:
    """Every TRADING symbol quoted in one of `quote_assets` (all when empty), sorted, without repeats.

    USD-M's list also holds Chinese-character symbols (binance.md §4.4): their stream names cannot be
    built from our whitelist, so they are returned apart for the caller to report, not recorded.
    """
    wanted_quotes = frozenset(quote_assets)
    chosen: set[str] = set()
    unnamable: set[str] = set()
    for info in infos:
        if info.status != TRADING or (wanted_quotes and info.quote_asset not in wanted_quotes):
            continue
        if SYMBOL_PATTERN.match(info.symbol):
            chosen.add(info.symbol)
        else:
            unnamable.add(info.symbol)
    return Selection(sorted(chosen), sorted(unnamable))


def quote_assets_seen(infos: Iterable[SymbolInfo]) -> list[str]:
    """The quote assets of the TRADING symbols, for the error naming what a filter could have matched."""
    return sorted({info.quote_asset for info in infos if info.status == TRADING and info.quote_asset})


def rate_limits_request(market: Market, base_url: str, probe_symbol: str) -> RestRequest:
    """The smallest exchangeInfo that still carries `rateLimits`: spot for one symbol (weight 20
    either way), USD-M whole (it has no `symbol` parameter; weight 1)."""
    if market == "spot":
        url = base_url.rstrip("/") + SPOT_EXCHANGE_INFO_PATH
        return RestRequest("spot", "exchange_info", url, {"symbol": probe_symbol}, SPOT_EXCHANGE_INFO_WEIGHT)
    return exchange_info_request("futures", base_url)


# Bounds of a believable REQUEST_WEIGHT per minute; anything outside is a broken answer, not a limit.
WEIGHT_LIMIT_BOUNDS: Final = (100, 1_000_000)


def request_weight_limit_1m(body: bytes) -> int | None:
    """REQUEST_WEIGHT per 1 MINUTE from exchangeInfo's `rateLimits` (binance.md §4.5: "read the
    rateLimits array"); None when it is missing or unbelievable."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    limits = parsed.get("rateLimits") if isinstance(parsed, dict) else None
    if not isinstance(limits, list):
        return None
    for entry in limits:
        if (
            isinstance(entry, dict)
            and entry.get("rateLimitType") == "REQUEST_WEIGHT"
            and entry.get("interval") == "MINUTE"
            and entry.get("intervalNum") == 1
            and type(entry.get("limit")) is int
            and WEIGHT_LIMIT_BOUNDS[0] <= entry["limit"] <= WEIGHT_LIMIT_BOUNDS[1]
        ):
            return int(entry["limit"])
    return None
