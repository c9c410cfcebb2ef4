"""Test helpers that queue and count events; the events themselves come from `collector.fake.envelopes`."""

from __future__ import annotations

import psycopg2
import redis

from collector.fake.envelopes import (
    AGG_TRADES_BULK_SQL,
    BASE_MS,
    agg_trade,
    depth_snapshot,
    depth_update,
    force_order,
    mark_price_frame,
    open_interest,
)
from collector.queue import keys

__all__ = [
    "AGG_TRADES_BULK_SQL",
    "BASE_MS",
    "agg_trade",
    "depth_snapshot",
    "depth_update",
    "force_order",
    "mark_price_frame",
    "open_interest",
    "queue_agg_trades",
    "stored_agg_trades",
]


def queue_agg_trades(client: redis.Redis, total: int) -> None:
    """Queue `total` aggregate trades for the drain, in pushes of 10,000."""
    events = [agg_trade(i) for i in range(total)]
    for start in range(0, total, 10_000):
        client.rpush(keys.queue("agg_trades"), *events[start : start + 10_000])


def stored_agg_trades(database_url: str) -> int:
    """Rows in agg_trades now."""
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM agg_trades")
            return int(cur.fetchone()[0])
    finally:
        conn.close()
