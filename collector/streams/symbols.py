"""The stream process's symbol universe: resolved at start, published, and followed while running.

- At start each market's list is resolved: the configured one, or with `*_SYMBOLS=ALL` the TRADING
  symbols of exchangeInfo quoted in `*_QUOTE_ASSETS` (`collector.binance.exchange_info`), fetched
  through the shared REST client in a thread. If exchangeInfo fails, the list the last run published
  is used with a WARNING; with none, `ServiceUnavailable` (one line, exit 2). Every list is published
  (`collector.queue.symbols`) for the REST planner, /health and `collector trigger`.
- Every SYMBOLS_REFRESH_INTERVAL_S the ALL markets are asked again. New listings are subscribed and
  delistings unsubscribed on the open connections, where `collector.streams.placement` puts them; the
  other streams keep their sockets, so their depth chains and counts go on untouched. A failed
  refresh logs one WARNING and keeps the current list; a change logs one INFO line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Final, Protocol

import redis
import requests

from collector.binance.exchange_info import (
    ExchangeInfoError,
    Selection,
    exchange_info_request,
    parse_exchange_info,
    quote_assets_seen,
    select_symbols,
)
from collector.binance.streams import MAX_STREAMS_PER_CONNECTION_BINANCE, ConnectionPlan, stream_specs
from collector.errors import ConfigError, RestError, ServiceUnavailable
from collector.queue.symbols import read_symbols, write_symbols
from collector.rest.client import RestClient
from collector.settings import Market, Settings
from collector.streams.placement import Carried, Placement, plan_placement
from collector.streams.shard import Shard

logger = logging.getLogger(__name__)

MARKETS: Final[tuple[Market, ...]] = ("spot", "futures")
NAMES_IN_LOG: Final = 10  # symbols named in one log line; the rest are counted


class SymbolsUnavailable(Exception):
    """exchangeInfo could not be fetched or read (the message says which and why)."""


class EmptySelection(ConfigError):
    """exchangeInfo answered, but no TRADING symbol passed `*_QUOTE_ASSETS`: a filter to fix."""


SymbolFetcher = Callable[[Market], Awaitable[Selection]]


class Subscriptions(Protocol):
    """What the follower needs of the stream process (`collector.streams.runner.StreamProcess`)."""

    @property
    def used_ids(self) -> Collection[str]: ...

    def carried(self) -> list[Carried]: ...

    async def apply_placement(self, placement: Placement) -> None: ...


def exchange_info_fetcher(settings: Settings, client: redis.Redis) -> SymbolFetcher:
    """`fetch(market)` -> the market's selection; raises `SymbolsUnavailable` or `EmptySelection`."""
    bases: dict[Market, str] = {
        "spot": settings.binance_spot_rest_url,
        "futures": settings.binance_futures_rest_url,
    }
    clients: dict[Market, RestClient] = {}  # one per market: a RestClient is not thread-safe
    reported: set[tuple[Market, str]] = set()

    def fetch_blocking(market: Market) -> Selection:
        rest = clients.get(market)
        if rest is None:
            rest = clients[market] = RestClient(settings, client, requests.Session())
        request = exchange_info_request(market, bases[market])
        try:
            body = rest.get(request).body
            infos = parse_exchange_info(body)
        except (RestError, ExchangeInfoError, redis.RedisError) as error:
            raise SymbolsUnavailable(f"GET {request.url}: {error}") from None
        quotes = settings.quote_assets(market)
        selection = select_symbols(infos, quotes)
        for symbol in selection.unnamable:
            if (market, symbol) not in reported:  # once per symbol, not at every refresh
                reported.add((market, symbol))
                logger.info(
                    "symbols.skipped market=%s symbol=%r reason=not a stream-safe name", market, symbol
                )
        if not selection.symbols:
            name = f"{market.upper()}_QUOTE_ASSETS"
            if quotes:
                seen = ", ".join(quote_assets_seen(infos)) or "none"
                raise EmptySelection(
                    f"{name}: {','.join(quotes)} matches no TRADING symbol of {request.url} "
                    f"(quote assets there: {seen})"
                )
            raise SymbolsUnavailable(f"GET {request.url}: no TRADING symbol in the answer")
        return selection

    async def fetch(market: Market) -> Selection:
        return await asyncio.to_thread(fetch_blocking, market)

    return fetch


def with_symbols(settings: Settings, symbols: dict[Market, list[str]]) -> Settings:
    """`settings` naming the resolved lists, so the stream planning functions work on them unchanged."""
    return settings.model_copy(
        update={"spot_symbols": symbols["spot"], "futures_symbols": symbols["futures"]}
    )


def preview(names: Sequence[str], limit: int = NAMES_IN_LOG) -> str:
    """`A,B,C` or `A,B,...(+12)` for a log line."""
    if not names:
        return "-"
    shown = ",".join(names[:limit])
    return shown if len(names) <= limit else f"{shown},...(+{len(names) - limit})"


async def resolve_symbols(
    settings: Settings, fetch: SymbolFetcher, client: redis.Redis
) -> dict[Market, list[str]]:
    """Every market's list at start, published; `ServiceUnavailable` / `ConfigError` when there is none."""
    symbols: dict[Market, list[str]] = {}
    for market in MARKETS:
        if not settings.symbols_all(market):
            symbols[market] = list(settings.symbols(market))
            continue
        try:
            symbols[market] = (await fetch(market)).symbols
        except SymbolsUnavailable as error:
            known = await asyncio.to_thread(read_symbols, client, market)
            if not known:
                raise ServiceUnavailable(
                    f"{market.upper()}_SYMBOLS=ALL needs exchangeInfo at start, and no earlier list is "
                    f"published: {error}"
                ) from None
            logger.warning(
                "symbols.exchange_info_failed market=%s error=%s action=using the %d symbols the last run "
                "published",
                market,
                error,
                len(known),
            )
            symbols[market] = known
        logger.info(
            "symbols.resolved market=%s symbols=%d quote_assets=%s refresh_s=%g",
            market,
            len(symbols[market]),
            ",".join(settings.quote_assets(market)) or "any",
            settings.symbols_refresh_interval_s,
        )
    await _publish(client, symbols)
    return symbols


async def _publish(client: redis.Redis, symbols: dict[Market, list[str]]) -> None:
    for market, names in symbols.items():
        await asyncio.to_thread(write_symbols, client, market, names)


class SymbolFollower:
    """Refreshes the ALL markets' lists and moves the process's subscriptions with them."""

    def __init__(
        self,
        settings: Settings,
        fetch: SymbolFetcher,
        client: redis.Redis,
        symbols: dict[Market, list[str]],
        shard: Shard | None = None,
    ) -> None:
        self.settings = settings
        self.shard = shard or Shard()  # the streams of the other shards' symbols are theirs
        self.symbols = {market: list(names) for market, names in symbols.items()}
        self._fetch = fetch
        self._client = client

    async def run(self, process: Subscriptions) -> None:
        """Refresh every SYMBOLS_REFRESH_INTERVAL_S until cancelled."""
        while True:
            await asyncio.sleep(self.settings.symbols_refresh_interval_s)
            await self.refresh(process)

    async def refresh(self, process: Subscriptions) -> None:
        """Ask exchangeInfo again for every ALL market and follow what changed; publish every list."""
        for market in MARKETS:
            if not self.settings.symbols_all(market):
                continue
            try:
                selection = await self._fetch(market)
            except (SymbolsUnavailable, EmptySelection) as error:
                logger.warning(
                    "symbols.refresh_failed market=%s error=%s action=keeping the %d current symbols",
                    market,
                    error,
                    len(self.symbols[market]),
                )
                continue
            await self.follow(process, market, selection.symbols)
        try:
            await _publish(self._client, self.symbols)
        except (redis.RedisError, OSError) as error:
            logger.warning("symbols.publish_failed error=%s action=retry at the next refresh", error)

    async def follow(self, process: Subscriptions, market: Market, symbols: list[str]) -> None:
        """Make `market` record `symbols`: subscribe the new ones, unsubscribe the gone ones."""
        old = set(self.symbols[market])
        added = sorted(set(symbols) - old)
        removed = sorted(old - set(symbols))
        if not added and not removed:
            return
        self.symbols[market] = sorted(symbols)
        placement = self.placement(process)
        await process.apply_placement(placement)
        logger.info(
            "symbols.changed market=%s added=%d removed=%d now=%d connections_changed=%d opened=%d "
            "closed=%d added_symbols=%s removed_symbols=%s",
            market,
            len(added),
            len(removed),
            len(symbols),
            len(placement.changes),
            len(placement.opened),
            len(placement.closed),
            preview(added),
            preview(removed),
        )

    def placement(self, process: Subscriptions) -> Placement:
        """How the process's connections must change to carry this shard's streams of `symbols`."""
        return self._plan(process.carried(), process.used_ids)

    def initial_plans(self) -> list[ConnectionPlan]:
        """The connections to open at start: this shard's streams, split as Binance's limits allow."""
        return list(self._plan([], ()).opened)

    def _plan(self, carried: Sequence[Carried], used_ids: Collection[str]) -> Placement:
        per_connection = min(self.settings.ws_max_streams_per_connection, MAX_STREAMS_PER_CONNECTION_BINANCE)
        every = stream_specs(with_symbols(self.settings, self.symbols))
        wanted = [spec for spec in every if self.shard.owns_stream(spec.name)]
        bases: dict[Market, str] = {
            "spot": self.settings.binance_spot_ws_url,
            "futures": self.settings.binance_futures_ws_url,
        }
        return plan_placement(carried, wanted, per_connection, bases, used_ids, self.shard.id_prefix)
