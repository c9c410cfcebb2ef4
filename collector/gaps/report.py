"""`collector gaps`: the gap ledger as a table, depth gaps and stream outages with their durations.

The rows come from PostgreSQL (`depth_gaps`, `stream_gaps`); gaps that the drains have not written
yet are still in the Redis queues, so a gap can appear a few seconds after it was detected.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from psycopg2 import sql
from psycopg2.extensions import connection as Connection

DEFAULT_SINCE: Final = timedelta(hours=24)


@dataclass(frozen=True)
class GapRow:
    kind: str  # depth | stream
    market: str
    name: str  # symbol or stream
    started: datetime
    ended: datetime | None
    cause: str
    detail: str  # the update-id bounds, or the connection


def _conditions(market: str | None, symbol: str | None, name_column: str, symbol_sql: str) -> sql.Composed:
    parts = [sql.SQL("{} >= %(since)s").format(sql.Identifier(name_column))]
    if market is not None:
        parts.append(sql.SQL("market = %(market)s"))
    if symbol is not None:
        parts.append(sql.SQL(symbol_sql))
    return sql.SQL(" AND ").join(parts)


def read_gaps(conn: Connection, since: datetime, market: str | None, symbol: str | None) -> list[GapRow]:
    """Every depth gap detected and stream outage started since `since`, oldest first."""
    params = {
        "since": since,
        "market": market,
        "symbol": symbol,
        "stream_prefix": f"{(symbol or '').lower()}@",
    }
    depth = sql.SQL(
        "SELECT market, symbol, detected_at, resynced_at, cause, last_update_id, next_update_id,"
        " resync_update_id FROM depth_gaps WHERE {}"
    ).format(_conditions(market, symbol, "detected_at", "symbol = %(symbol)s"))
    streams = sql.SQL(
        "SELECT market, stream, started_at, ended_at, cause, connection FROM stream_gaps WHERE {}"
    ).format(_conditions(market, symbol, "started_at", "starts_with(stream, %(stream_prefix)s)"))
    rows: list[GapRow] = []
    with conn.cursor() as cur:
        cur.execute(depth, params)
        for m, s, start, end, cause, last_u, next_u, resync_u in cur.fetchall():
            detail = f"u {last_u} -> U {next_u}" + (f", resync at {resync_u}" if resync_u is not None else "")
            rows.append(GapRow("depth", m, s, start, end, cause, detail))
        cur.execute(streams, params)
        for m, stream, start, end, cause, connection in cur.fetchall():
            rows.append(GapRow("stream", m, stream, start, end, cause, connection or ""))
    return sorted(rows, key=lambda r: (r.started, r.kind, r.name))


def duration(row: GapRow, now: datetime) -> str:
    """`1.25 s`, or `open 42 s` while the gap is not closed."""
    if row.ended is None:
        return f"open {(now - row.started).total_seconds():.0f} s"
    return f"{(row.ended - row.started).total_seconds():.3f} s"


def format_gaps(rows: list[GapRow], now: datetime) -> str:
    """The table `collector gaps` prints. Pure."""
    if not rows:
        return "no gaps"
    header = ("KIND", "MARKET", "SYMBOL/STREAM", "STARTED (UTC)", "DURATION", "CAUSE", "DETAIL")
    cells = [header] + [
        (
            r.kind,
            r.market,
            r.name,
            r.started.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            duration(r, now),
            r.cause,
            r.detail,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    depth = sum(1 for r in rows if r.kind == "depth")
    still_open = sum(1 for r in rows if r.ended is None)
    lines.append(f"{depth} depth gaps, {len(rows) - depth} stream outages, {still_open} open")
    return "\n".join(lines)
