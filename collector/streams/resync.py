"""Resync snapshots for the stream process: one symbol's depth, fetched off the event loop.

The same `RestClient` as the scheduled polls (timeouts, retries, the 429/418 pause and the weight
counter shared through Redis), one per market because a client is not thread-safe, each called from
a worker thread (the ledger runs one resync at a time per market).

Resyncs have priority over the scheduled polls: they may bring the minute's weight up to the margin,
while scheduled polls stop at the resync share below it (`collector.rest.budget`). A reconnection
that opens a hundred gaps at once therefore spends what the minute allows, and the rest waits for the
next minute in the worker thread, never in a 429 (and then a 418 ban).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import redis
import requests

from collector.binance.rest import Market, depth_request
from collector.errors import RestError
from collector.rest.client import RestClient
from collector.settings import Settings
from collector.streams.ledger import SnapshotFetcher

logger = logging.getLogger(__name__)

# A resync waits for the next minute's weight rather than give up (its thread, not the event loop).
RESYNC_MAX_WAIT_S: Final = 65.0


def snapshot_fetcher(settings: Settings, client: redis.Redis) -> SnapshotFetcher:
    """`fetch(market, symbol)` -> (body, receive time µs), or None when the request failed."""
    clients: dict[str, RestClient] = {}
    bases = {"spot": settings.binance_spot_rest_url, "futures": settings.binance_futures_rest_url}

    def fetch_blocking(market: Market, symbol: str) -> tuple[bytes, int] | None:
        rest = clients.get(market)
        if rest is None:
            rest = clients[market] = RestClient(
                settings, client, requests.Session(), max_wait_s=RESYNC_MAX_WAIT_S, priority="resync"
            )
        request = depth_request(market, bases[market], symbol, settings.depth_snapshot_limit)
        try:
            response = rest.get(request)
        except (RestError, redis.RedisError) as error:  # Redis holds the shared pause and weight
            logger.warning("rest.resync_failed market=%s symbol=%s error=%s", market, symbol, error)
            return None
        return response.body, response.received_at_us

    async def fetch(market: str, symbol: str) -> tuple[bytes, int] | None:
        if market not in bases:
            raise ValueError(f"unknown market {market!r}")
        return await asyncio.to_thread(fetch_blocking, market, symbol)  # type: ignore[arg-type]

    return fetch
