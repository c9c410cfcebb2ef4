"""Celery shells of the REST pollers: choose the symbols, open the clients, call `collector.rest.poll`.

Retries happen inside the REST client (backoff, shared 429/418 pause); the tasks themselves are
never retried by Celery, so a bad symbol or market given by hand costs one error line and nothing more.
"""

from __future__ import annotations

from typing import Any

import redis
import requests
from celery.utils.log import get_task_logger

from collector.binance.rest import Market
from collector.errors import RestError
from collector.logonce import Transitions
from collector.queue.client import redis_client
from collector.rest.planner import run_tick
from collector.rest.poll import poll_depth_snapshots, poll_open_interest
from collector.retry import is_transient
from collector.settings import SYMBOL_PATTERN, Settings, get_settings
from collector.tasks.base import collector_task

logger = get_task_logger(__name__)
_redis_state = Transitions(logger, "rest.poll.redis")

MARKETS: tuple[Market, ...] = ("spot", "futures")


def _symbols(settings: Settings, market: Market, symbol: str | None) -> list[str] | None:
    """The configured symbols, or the one given by hand; None (after one error line) when malformed."""
    if symbol is None:
        return list(settings.symbols(market))
    wanted = symbol.strip().upper()
    if not SYMBOL_PATTERN.match(wanted):
        logger.error("rest.bad_symbol market=%s symbol=%r (letters and digits, e.g. BTCUSDT)", market, symbol)
        return None
    return [wanted]


def _markets(settings: Settings, market: str | None, symbol: str | None) -> tuple[Market, ...]:
    """The market asked for; else those configured with `symbol` (both when neither names it)."""
    if market is not None:
        return tuple(m for m in MARKETS if m == market)
    if symbol is not None:
        wanted = symbol.strip().upper()
        configured = tuple(m for m in MARKETS if wanted in settings.symbols(m))
        return configured or MARKETS
    return MARKETS


@collector_task("collector.tasks.rest.poll_due", soft_time_limit_s=30, time_limit_s=45)
def poll_due() -> dict[str, Any] | None:
    """Send the scheduled open-interest and depth-snapshot calls that are due now (one tick).

    Beat sends one every REST_POLL_TICK_S and the calls are claimed atomically in Redis, so ticks
    may overlap on several workers without sending anything twice. It never sleeps: a paused market
    or a spent minute leaves the calls for a later tick.
    """
    settings = get_settings()
    client = redis_client(settings)
    try:
        summary = run_tick(settings, client).as_dict()
    except redis.RedisError as error:
        if not is_transient(error):
            raise
        # Redis holds the cursors and the weight: no tick can run without it. Beat sends one every
        # second, so only the change is logged (collector.logonce), not a traceback a second.
        _redis_state.report(up=False, error=error)
        return None
    finally:
        client.close()
    _redis_state.report(up=True)
    return summary


@collector_task("collector.tasks.rest.open_interest")
def open_interest(symbol: str | None = None) -> dict[str, Any] | None:
    """Fetch open interest for `symbol`, or for every FUTURES_SYMBOLS symbol, into `open_interest`.

    Idempotence key: (symbol, receive time). Each run is a new observation stamped with the time its
    answer arrived; a duplicate run stores one more observation, never a duplicate row (the drain's
    natural key is (symbol, time), and the time is fixed in the envelope before it is queued).
    """
    settings = get_settings()
    symbols = _symbols(settings, "futures", symbol)
    if symbols is None:
        return None
    client = redis_client(settings)
    try:
        with requests.Session() as session:
            return _fail_if_nothing_fetched(
                [poll_open_interest(settings, client, session, symbols).as_dict()]
            )[0]
    finally:
        client.close()


@collector_task("collector.tasks.rest.depth_snapshot", soft_time_limit_s=240, time_limit_s=280)
def depth_snapshot(market: str | None = None, symbol: str | None = None) -> list[dict[str, Any]] | None:
    """Fetch a DEPTH_SNAPSHOT_LIMIT-level order book per symbol into `depth_snapshots`.

    `market` None = both markets (or, with `symbol`, those configured with it); `symbol` None =
    that market's configured symbols.
    Idempotence key: (market, symbol, lastUpdateId, receive time). Each run is a new observation
    stamped with its receive time; a duplicate run stores one more snapshot, never a duplicate row.
    """
    settings = get_settings()
    if market is not None and market not in MARKETS:
        logger.error("rest.bad_market market=%r (spot or futures)", market)
        return None
    markets = _markets(settings, market, symbol)
    client = redis_client(settings)
    summaries: list[dict[str, Any]] = []
    try:
        with requests.Session() as session:
            for each in markets:
                symbols = _symbols(settings, each, symbol)
                if symbols is None:
                    return None
                if symbols:
                    summaries.append(poll_depth_snapshots(settings, client, session, each, symbols).as_dict())
    finally:
        client.close()
    return _fail_if_nothing_fetched(summaries)


def _fail_if_nothing_fetched(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run in which every call failed is a failed task (Flower shows FAILURE, not SUCCESS)."""
    failed = {symbol: reason for summary in summaries for symbol, reason in summary["failed"].items()}
    if failed and not any(summary["ok"] for summary in summaries):
        first = next(iter(failed.items()))
        raise RestError(f"every REST call failed ({len(failed)}), e.g. {first[0]}: {first[1]}")
    return summaries
