"""Resync snapshots for the stream process: one symbol's depth, fetched off the event loop.

The same `RestClient` as the scheduled polls (timeouts, retries, the 429/418 pause shared through
Redis), one per market because a client is not thread-safe, each called from a worker thread.
"""

from __future__ import annotations

import asyncio
import logging

import redis
import requests

from collector.binance.rest import Market, depth_request
from collector.errors import RestError
from collector.rest.client import RestClient
from collector.settings import Settings
from collector.streams.ledger import SnapshotFetcher

logger = logging.getLogger(__name__)


def snapshot_fetcher(settings: Settings, client: redis.Redis) -> SnapshotFetcher:
    """`fetch(market, symbol)` -> (body, receive time µs), or None when the request failed."""
    clients: dict[str, RestClient] = {}
    bases = {"spot": settings.binance_spot_rest_url, "futures": settings.binance_futures_rest_url}

    def fetch_blocking(market: Market, symbol: str) -> tuple[bytes, int] | None:
        rest = clients.get(market)
        if rest is None:
            rest = clients[market] = RestClient(settings, client, requests.Session())
        request = depth_request(market, bases[market], symbol, settings.depth_snapshot_limit)
        try:
            response = rest.get(request)
        except RestError as error:
            logger.warning("rest.resync_failed market=%s symbol=%s error=%s", market, symbol, error)
            return None
        return response.body, response.received_at_us

    async def fetch(market: str, symbol: str) -> tuple[bytes, int] | None:
        if market not in bases:
            raise ValueError(f"unknown market {market!r}")
        return await asyncio.to_thread(fetch_blocking, market, symbol)  # type: ignore[arg-type]

    return fetch
