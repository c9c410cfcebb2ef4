"""Resync snapshots for the stream process: one symbol's depth, fetched off the event loop.

The same `RestClient` as the scheduled polls (timeouts, retries, the 429/418 pause shared through
Redis), one per market because a client is not thread-safe, each called from a worker thread.

A reconnection of a connection carrying many symbols can open as many gaps at once; fetched back to
back, their snapshots alone would exceed the market's weight budget and earn a 429, then a 418
ban. Resyncs therefore spend at most RESYNC_WEIGHT_SHARE of the market's per-minute weight (a
token bucket), and wait for the next minute when Binance reports the minute's weight nearly used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

import redis
import requests

from collector.binance.rest import FUTURES_WEIGHT_PER_MINUTE, SPOT_WEIGHT_PER_MINUTE, Market, depth_request
from collector.errors import RestError
from collector.rest.client import RestClient
from collector.settings import Settings
from collector.streams.ledger import SnapshotFetcher

logger = logging.getLogger(__name__)

# Of each market's request weight per minute (binance.md §4.5), what resyncs may use; the scheduled
# polls keep the rest. Spot 1,500 = 30 snapshots of 1,000 levels a minute; USD-M 600 = 30.
RESYNC_WEIGHT_SHARE: Final = 0.25
# Above this share of the minute's weight (X-MBX-USED-WEIGHT-1M), wait for the next minute.
WEIGHT_HIGH_FRACTION: Final = 0.8
PACING_LOG_S: Final = 5.0


class WeightBucket:
    """A token bucket of request weight, refilled continuously. Pure: the caller passes the time."""

    def __init__(self, per_minute: float, now_s: float) -> None:
        self.rate_per_s = per_minute / 60
        self.capacity = per_minute
        self.tokens = per_minute
        self.updated_s = now_s

    def delay_s(self, weight: int, now_s: float) -> float:
        """Seconds to wait before spending `weight`; the weight counts as spent from now on."""
        self.tokens = min(self.capacity, self.tokens + (now_s - self.updated_s) * self.rate_per_s)
        self.updated_s = now_s
        self.tokens -= weight
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate_per_s


def seconds_to_next_minute(now_s: float) -> float:
    """Binance counts weight per clock minute: what is left of this one."""
    return 60 - now_s % 60


def snapshot_fetcher(settings: Settings, client: redis.Redis) -> SnapshotFetcher:
    """`fetch(market, symbol)` -> (body, receive time µs), or None when the request failed."""
    clients: dict[str, RestClient] = {}
    bases = {"spot": settings.binance_spot_rest_url, "futures": settings.binance_futures_rest_url}
    budgets = {"spot": SPOT_WEIGHT_PER_MINUTE, "futures": FUTURES_WEIGHT_PER_MINUTE}
    buckets = {m: WeightBucket(budget * RESYNC_WEIGHT_SHARE, time.time()) for m, budget in budgets.items()}
    held_until = dict.fromkeys(budgets, 0.0)

    def fetch_blocking(market: Market, symbol: str) -> tuple[bytes, int] | None:
        rest = clients.get(market)
        if rest is None:
            rest = clients[market] = RestClient(settings, client, requests.Session())
        request = depth_request(market, bases[market], symbol, settings.depth_snapshot_limit)
        now_s = time.time()
        wait_s = max(buckets[market].delay_s(request.weight, now_s), held_until[market] - now_s)
        if wait_s > 0:
            log = logger.info if wait_s >= PACING_LOG_S else logger.debug
            log("rest.resync_paced market=%s symbol=%s wait_s=%.1f", market, symbol, wait_s)
            time.sleep(wait_s)
        try:
            response = rest.get(request)
        except (RestError, redis.RedisError) as error:  # Redis holds the shared pause and counters
            logger.warning("rest.resync_failed market=%s symbol=%s error=%s", market, symbol, error)
            return None
        if (
            response.used_weight is not None
            and response.used_weight >= budgets[market] * WEIGHT_HIGH_FRACTION
        ):
            # This snapshot goes on at once; the market's next resync waits for the next minute.
            now_s = time.time()
            held_until[market] = now_s + seconds_to_next_minute(now_s)
            logger.info(
                "rest.resync_held market=%s used_1m=%d until_next_minute_s=%.1f",
                market,
                response.used_weight,
                held_until[market] - now_s,
            )
        return response.body, response.received_at_us

    async def fetch(market: str, symbol: str) -> tuple[bytes, int] | None:
        if market not in bases:
            raise ValueError(f"unknown market {market!r}")
        return await asyncio.to_thread(fetch_blocking, market, symbol)  # type: ignore[arg-type]

    return fetch
