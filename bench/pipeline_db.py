"""The pipeline benchmark's PostgreSQL side: its throwaway server, and the figures read from it by
table name only (latency from commit timestamps, rows, sizes, compression, a plain COPY, top statements).

Latency method: the server runs with `track_commit_timestamp = on`, so `pg_xact_commit_timestamp(xmin)`
is the commit time of the transaction that inserted each row, whatever path wrote it (COPY, INSERT …
SELECT, a hypertable chunk); latency = that commit time - the row's `event_time` (Binance's `E`, which
the fake stamps, in ms, as it writes the frame). No column is added to the collector's tables, so any
version of the collector can be measured. Its cost: 10 bytes per transaction in pg_commit_ts, nothing
per row; the queries run between measurement windows.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg2.extensions import connection as Connection

from collector.local.servers import LocalService, start_postgres, timescaledb_installed

# Shown with the results: the durability settings the figures were measured under.
SHOWN_SETTINGS = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "track_commit_timestamp",
    "shared_preload_libraries",
)


def start_bench_postgres(data_dir: Path, statements: bool) -> tuple[LocalService, bool]:
    """A durable PostgreSQL (server defaults, fsync on) with commit timestamps tracked and
    TimescaleDB preloaded when installed (`statements`: pg_stat_statements too); (server, timescale).

    Started once (initdb), then again with these lines appended to postgresql.conf: `start_postgres`
    puts TimescaleDB's preload on the command line, which would override a preload list set by file.
    """
    timescale = timescaledb_installed()
    server = start_postgres(data_dir, durable=True, timescaledb=False)
    server.stop()
    libraries = (["timescaledb"] if timescale else []) + (["pg_stat_statements"] if statements else [])
    lines = ["track_commit_timestamp = on", f"shared_preload_libraries = '{','.join(libraries)}'"]
    if timescale:
        # Telemetry off: these servers have no internet, and the project's data is not to be reported.
        lines.append("timescaledb.telemetry_level = off")
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write("\n# bench/pipeline.py\n" + "\n".join(lines) + "\n")
    server = start_postgres(data_dir, port=server.port, durable=True, timescaledb=False)
    return server, timescale


def settings(conn: Connection) -> dict[str, str]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
            (list(SHOWN_SETTINGS),),
        )
        return dict(cur.fetchall())


def timescale_active(conn: Connection) -> bool:
    """Whether agg_trades is a hypertable here."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('timescaledb_information.hypertables') IS NOT NULL")
        if not cur.fetchone()[0]:
            return False
        cur.execute(
            "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = 'agg_trades'"
        )
        return bool(cur.fetchone()[0])


@dataclass(frozen=True)
class WindowRows:
    """The agg_trades rows of one measurement window [t0, t1) (wall-clock seconds)."""

    of_window: int  # rows whose event (E) falls in the window
    committed_in_window: int  # rows committed during the window, whatever their event time
    p50_s: float | None
    p99_s: float | None
    max_s: float | None


WINDOW_SQL = """
WITH r AS (
    SELECT event_time, pg_xact_commit_timestamp(xmin) AS committed
    FROM agg_trades
    WHERE trade_time >= to_timestamp(%(lo)s)
)
SELECT
    count(*) FILTER (WHERE event_time >= to_timestamp(%(t0)s) AND event_time < to_timestamp(%(t1)s)),
    count(*) FILTER (WHERE committed >= to_timestamp(%(t0)s) AND committed < to_timestamp(%(t1)s)),
    percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM committed - event_time))
        FILTER (WHERE event_time >= to_timestamp(%(t0)s) AND event_time < to_timestamp(%(t1)s)),
    max(extract(epoch FROM committed - event_time))
        FILTER (WHERE event_time >= to_timestamp(%(t0)s) AND event_time < to_timestamp(%(t1)s))
FROM r
"""
# Rows committed in a window were received after the previous window's backlog drained: looking
# back this far from the window's start (by trade time, the hypertables' partitioning column) finds them.
LOOKBACK_S = 120.0


def window_rows(conn: Connection, t0: float, t1: float) -> WindowRows:
    with conn.cursor() as cur:
        cur.execute(WINDOW_SQL, {"lo": t0 - LOOKBACK_S, "t0": t0, "t1": t1})
        of_window, committed, quantiles, worst = cur.fetchone()
    conn.commit()
    p50, p99 = (float(quantiles[0]), float(quantiles[1])) if quantiles else (None, None)
    return WindowRows(int(of_window), int(committed), p50, p99, float(worst) if worst is not None else None)


def rows_of(conn: Connection, t0: float, t1: float) -> int:
    """agg_trades rows whose event falls in [t0, t1): stable once that window has drained."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM agg_trades WHERE trade_time >= to_timestamp(%s)"
            " AND event_time >= to_timestamp(%s) AND event_time < to_timestamp(%s)",
            (t0 - LOOKBACK_S, t0, t1),
        )
        count = int(cur.fetchone()[0])
    conn.commit()
    return count


def count_rows(conn: Connection, table: str) -> int:
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        count = int(cur.fetchone()[0])
    conn.commit()
    return count


def filled_tables(conn: Connection) -> dict[str, int]:
    """Rows of every table of the public schema that has any."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
        )
        names = [row[0] for row in cur.fetchall()]
    conn.commit()
    counts = {name: count_rows(conn, name) for name in names}
    return {name: rows for name, rows in counts.items() if rows}


def table_bytes(conn: Connection, table: str, hypertable: bool) -> int:
    """Total bytes of a table with its indexes and TOAST (a hypertable's chunks included)."""
    with conn.cursor() as cur:
        if hypertable:
            cur.execute("SELECT hypertable_size(%s)", (table,))
        else:
            cur.execute("SELECT pg_total_relation_size(%s)", (table,))
        size = int(cur.fetchone()[0] or 0)
    conn.commit()
    return size


def hypertables(conn: Connection) -> dict[str, bool]:
    """Hypertable name -> whether compression is enabled on it."""
    with conn.cursor() as cur:
        cur.execute("SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables")
        found = {name: bool(enabled) for name, enabled in cur.fetchall()}
    conn.commit()
    return found


def compressed_bytes(conn: Connection, table: str) -> tuple[int, int]:
    """Compress every chunk of `table`; (bytes before, bytes after) from TimescaleDB's own stats."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(compress_chunk(c, if_not_compressed => true)) FROM show_chunks(%s) c", (table,)
        )
        cur.execute(
            "SELECT sum(before_compression_total_bytes), sum(after_compression_total_bytes)"
            " FROM hypertable_compression_stats(%s)",
            (table,),
        )
        before, after = cur.fetchone()
    conn.commit()
    return int(before or 0), int(after or 0)


def plain_copy_rate(conn: Connection, limit: int) -> tuple[float, int]:
    """(rows/s, rows) of COPY of up to `limit` stored agg_trades rows, as text, into an unindexed
    table with the same columns: the fastest this server takes those rows (no parsing, no dedup)."""
    buffer = io.BytesIO()
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS bench_plain_copy")
        cur.execute("CREATE TABLE bench_plain_copy AS SELECT * FROM agg_trades WITH NO DATA")
        conn.commit()
        cur.copy_expert(f"COPY (SELECT * FROM agg_trades LIMIT {int(limit)}) TO STDOUT", buffer)
        rows = buffer.getvalue().count(b"\n")
        buffer.seek(0)
        started = time.perf_counter()
        cur.copy_expert("COPY bench_plain_copy FROM STDIN", buffer)
        conn.commit()
        elapsed = time.perf_counter() - started
        cur.execute("DROP TABLE bench_plain_copy")
    conn.commit()
    return rows / elapsed, rows


def reset_statements(conn: Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        cur.execute("SELECT pg_stat_statements_reset()")
    conn.commit()


def top_statements(conn: Connection, count: int = 12) -> list[dict[str, Any]]:
    """The statements that took the most server time since the reset, with their time per row."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 110), calls, total_exec_time, rows"
            " FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT %s",
            (count,),
        )
        found = [
            {
                "query": query,
                "calls": int(calls),
                "total_ms": round(float(total), 1),
                "rows": int(rows),
                "us_per_row": round(1000 * float(total) / rows, 2) if rows else None,
            }
            for query, calls, total, rows in cur.fetchall()
        ]
    conn.commit()
    return found
