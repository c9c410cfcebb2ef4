"""The symbol universe in Redis: which symbols each market is recording right now.

With an explicit `SPOT_SYMBOLS` / `FUTURES_SYMBOLS` list that list is the answer. With `ALL`, the
stream process resolves the list from exchangeInfo (and refreshes it); it stores the result under
`collector.queue.keys.symbols(market)` so the REST planner, `/health` and `collector trigger` read
the very list the streams subscribe to.
"""

from __future__ import annotations

import orjson
import redis

from collector.queue import keys
from collector.settings import Market, Settings


def write_symbols(client: redis.Redis, market: Market, symbols: list[str]) -> None:
    """Publish the symbols `market` is recording (sorted, so readers can compare lists)."""
    client.set(keys.symbols(market), orjson.dumps(sorted(symbols)))


def read_symbols(client: redis.Redis, market: Market) -> list[str] | None:
    """The published symbols of `market`; None when the stream process has published none."""
    raw = client.get(keys.symbols(market))
    if raw is None:
        return None
    value = orjson.loads(raw)
    return [str(symbol) for symbol in value] if isinstance(value, list) else None


def current_symbols(settings: Settings, client: redis.Redis, market: Market) -> list[str]:
    """The symbols `market` records: the configured list, or (for ALL) the published one, else []."""
    if not settings.symbols_all(market):
        return list(settings.symbols(market))
    return read_symbols(client, market) or []
