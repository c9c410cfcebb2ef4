"""All TimescaleDB SQL lives here: hypertables, compression and retention, applied only when the
extension is installed. Without it the same tables work as plain PostgreSQL tables.

Every statement is idempotent (`if_not_exists => TRUE`), so `collector init-db` can run any time.
"""

from __future__ import annotations

import logging

from psycopg2.extensions import cursor as Cursor

from collector.db.schema import NATURAL_KEYS, TIME_COLUMNS
from collector.settings import Settings

logger = logging.getLogger(__name__)

# Compressed chunks are grouped by these columns, so queries for one symbol read one segment.
SEGMENT_BY = {
    "agg_trades": "market, symbol",
    "depth_updates": "market, symbol",
    "mark_prices": "symbol",
    "force_orders": "symbol",
    "open_interest": "symbol",
    "depth_snapshots": "market_type, symbol",
}


def order_by(table: str) -> str:
    """Newest first, then the rest of the natural key: TimescaleDB wants every unique-key column in
    segment-by or order-by, so a re-delivered row can be found (and skipped) inside a compressed chunk."""
    segment = {c.strip() for c in SEGMENT_BY[table].split(",")}
    time_column = TIME_COLUMNS[table]
    rest = [c for c in NATURAL_KEYS[table] if c not in segment and c != time_column]
    return ", ".join([f"{time_column} DESC", *rest])


def extension_available(cur: Cursor) -> bool:
    """True when the server has the timescaledb extension installed (loaded or not)."""
    cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    return cur.fetchone() is not None


def hypertable_statements(table: str, settings: Settings) -> list[str]:
    """The statements that make `table` a compressed hypertable with optional retention."""
    time_column = TIME_COLUMNS[table]
    statements = [
        f"SELECT create_hypertable('{table}', '{time_column}', "
        f"chunk_time_interval => INTERVAL '{settings.timescale_chunk_interval_h} hours', "
        "if_not_exists => TRUE, migrate_data => TRUE)",
    ]
    if settings.timescale_compress_after_days:
        statements += [
            f"ALTER TABLE {table} SET (timescaledb.compress, "
            f"timescaledb.compress_segmentby = '{SEGMENT_BY[table]}', "
            f"timescaledb.compress_orderby = '{order_by(table)}')",
            f"SELECT add_compression_policy('{table}', "
            f"INTERVAL '{settings.timescale_compress_after_days} days', if_not_exists => TRUE)",
        ]
    if settings.timescale_retention_days:
        statements.append(
            f"SELECT add_retention_policy('{table}', "
            f"INTERVAL '{settings.timescale_retention_days} days', if_not_exists => TRUE)"
        )
    return statements


def apply(cur: Cursor, settings: Settings) -> bool:
    """Enable the extension and convert every market-data table; False when Timescale is absent."""
    if not extension_available(cur):
        logger.info("initdb.timescale_absent action=plain_tables")
        return False
    cur.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    for table in TIME_COLUMNS:
        for statement in hypertable_statements(table, settings):
            cur.execute(statement)
        logger.info("initdb.hypertable table=%s time_column=%s", table, TIME_COLUMNS[table])
    return True
