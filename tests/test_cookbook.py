"""Every SQL query of docs/schema.md's "Querying the data" runs on TimescaleDB and on plain PostgreSQL."""

from __future__ import annotations

import pytest
import redis

from collector.db.connection import connect
from collector.db.init import init_db
from collector.drain import Drainer
from collector.queue import keys
from collector.settings import Settings
from tests import factories
from tests.markdown import DOCS, code_blocks, section


def cookbook_queries() -> list[str]:
    return code_blocks(section(DOCS / "schema.md", "Querying the data"), "sql")


def test_the_cookbook_has_the_queries_researchers_ask_for() -> None:
    """Last trades, 1m and 1h candles, liquidations by hour, latest snapshot, gaps, disk use."""
    queries = cookbook_queries()
    assert len(queries) == 8
    for needle in ("FROM agg_trades", "FROM candles_1m", "date_bin('1 hour'", "FROM liquidations_1m"):
        assert any(needle in q for q in queries), needle
    assert any("FROM depth_snapshots" in q for q in queries)
    assert any("FROM storage_usage" in q for q in queries)


@pytest.mark.parametrize("query", cookbook_queries(), ids=lambda q: q.split("FROM ", 1)[1].split()[0])
def test_cookbook_query_runs(query: str, settings_each_mode: Settings, redis_conn: redis.Redis) -> None:
    """The query runs as printed, with rows of every table in the database."""
    settings = settings_each_mode
    init_db(settings)
    drainer = Drainer(settings, redis_conn, lambda: connect(settings))
    envelopes = {
        "agg_trades": [factories.agg_trade(i) for i in (1, 2, 4)] + [factories.agg_trade(3, market="spot")],
        "depth_updates": [factories.depth_update(i) for i in (1, 2, 4)],
        "force_orders": [factories.force_order(i) for i in (1, 2)],
        "depth_snapshots": [factories.depth_snapshot(1), factories.depth_snapshot(2, "futures")],
        "mark_prices": [factories.mark_price_frame(1)],
        "open_interest": [factories.open_interest(1)],
    }
    for table, batch in envelopes.items():
        redis_conn.rpush(keys.queue(table), *batch)
        drainer.drain(table)
    conn = connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            rows = cur.fetchall()
    finally:
        conn.close()
    if "FROM agg_trades\nWHERE market" in query or "DISTINCT ON" in query:
        assert rows, "the query found none of the rows stored"
    if "FROM storage_usage" in query:
        assert len(rows) == 8  # the six market tables and the two of the gap ledger
        if settings.timescale == "off":
            assert all(ratio is None for _, _, ratio in rows)
