"""PostgreSQL reads for book rebuilding: the snapshot, diffs streamed through a named cursor, gap details."""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import orjson
import psycopg2
from psycopg2.extensions import STATUS_READY
from psycopg2.extensions import connection as Connection

from collector.book.engine import Diff, Market
from collector.book.replay import SnapshotRef, from_ms, to_ms
from collector.errors import ConfigError

logger = logging.getLogger(__name__)

# Rows per round trip of the diff cursor: memory holds one batch plus the book, whatever the range.
DIFF_BATCH_ROWS: Final = 2000
# Diffs buffered before a snapshot are seconds older than it (binance.md §5): the diffs a replay
# reads start this long before the snapshot's time.
DIFF_LOOKBACK: Final = timedelta(minutes=10)
# How far past the requested time the streamed window reaches; a quiet symbol's next diff may be
# later, and `next_diff` finds it without making the window unbounded.
DIFF_LOOKAHEAD: Final = timedelta(minutes=1)
# A ledger row detected up to this long after the diff that revealed the hole is the same gap.
LEDGER_SLACK: Final = timedelta(minutes=1)

# Snapshots and diffs are chosen and ordered by time, never by update id: ids may go back when the
# exchange restarts, so a higher id is not a later state (`collector.book.replay`).
#
# The last snapshot taken at or before the time. Its time is the exchange's `E` when Binance sent
# one (USD-M), else the receive time (spot sends no time), which has microseconds: `before` is the
# millisecond after the time's, so a snapshot counts from its millisecond, the precision of `E`, of
# `--at` and of the times the messages print.
_SNAPSHOT_COLUMNS = """
    last_update_id, coalesce(event_time, time), (payload->'bids')::text, (payload->'asks')::text
"""
_SNAPSHOT_SQL = f"""
    SELECT {_SNAPSHOT_COLUMNS} FROM depth_snapshots
    WHERE market_type = %(market)s AND symbol = %(symbol)s AND coalesce(event_time, time) < %(before)s
    ORDER BY coalesce(event_time, time) DESC, last_update_id DESC
    LIMIT 1
"""
# The first snapshot after the time with `lastUpdateId >= floor`.
_LATER_SNAPSHOT_SQL = f"""
    SELECT {_SNAPSHOT_COLUMNS} FROM depth_snapshots
    WHERE market_type = %(market)s AND symbol = %(symbol)s AND coalesce(event_time, time) >= %(before)s
        AND last_update_id >= %(floor)s
    ORDER BY coalesce(event_time, time), last_update_id
    LIMIT 1
"""
_FIRST_SNAPSHOT_SQL = f"""
    SELECT {_SNAPSHOT_COLUMNS} FROM depth_snapshots
    WHERE market_type = %(market)s AND symbol = %(symbol)s
    ORDER BY coalesce(event_time, time), last_update_id
    LIMIT 1
"""
# A diff with `u` below the snapshot's id is never applied (stale, a repeat, or ids going back):
# its levels are left in the database, only its ids and time are read.
_DIFF_COLUMNS = """
    first_update_id, final_update_id, previous_final_update_id,
    (extract(epoch FROM event_time) * 1000)::bigint,
    CASE WHEN final_update_id >= %(from_u)s THEN (payload->'b')::text END,
    CASE WHEN final_update_id >= %(from_u)s THEN (payload->'a')::text END
"""
# In time order, then u (several events in one millisecond); copies of one event from two
# connections (same E) come together.
_DIFFS_SQL = f"""
    SELECT {_DIFF_COLUMNS} FROM depth_updates
    WHERE market = %(market)s AND symbol = %(symbol)s AND event_time >= %(since)s AND event_time <= %(until)s
    ORDER BY event_time, final_update_id
"""
_NEXT_DIFF_SQL = f"""
    SELECT {_DIFF_COLUMNS} FROM depth_updates
    WHERE market = %(market)s AND symbol = %(symbol)s AND event_time > %(after)s
    ORDER BY event_time, final_update_id
    LIMIT 1
"""
# The diff's own event time too: after a restart the same ids recur in another run.
_RECEIVED_SQL = """
    SELECT min(received_at) FROM depth_updates
    WHERE market = %(market)s AND symbol = %(symbol)s AND final_update_id = %(u)s
        AND first_update_id = %(first_u)s AND event_time = %(event_time)s
"""
# Taken after the diff past the hole (`after`, its E): the snapshot it can resync on holds its chain's
# state at or past that diff's U - 1; an earlier one is of the chain before the hole.
_RESYNC_SQL = """
    SELECT last_update_id, coalesce(event_time, time) FROM depth_snapshots
    WHERE market_type = %(market)s AND symbol = %(symbol)s AND last_update_id >= %(floor)s
        AND coalesce(event_time, time) >= %(after)s
    ORDER BY coalesce(event_time, time), last_update_id
    LIMIT 1
"""
# A row of the collector's gap ledger for this hole, detected between the last good diff and shortly
# after the diff that revealed it; one with the same ids first. Ids alone do not tell: after a
# restart the same ids recur.
_LEDGER_SQL = """
    SELECT detected_at, resynced_at, resync_update_id, cause FROM depth_gaps
    WHERE market = %(market)s AND symbol = %(symbol)s AND detected_at BETWEEN %(since)s AND %(until)s
    ORDER BY (last_update_id = %(last_u)s OR next_update_id = %(next_u)s) IS TRUE DESC, detected_at
    LIMIT 1
"""


@dataclass(frozen=True)
class LedgerGap:
    """The columns of a `depth_gaps` row that a gap report uses."""

    detected_at: datetime
    resynced_at: datetime | None
    resync_update_id: int | None
    cause: str | None


@contextmanager
def read_transaction(conn: Connection) -> Iterator[None]:
    """One read-only REPEATABLE READ transaction, rolled back at the end; `conn` is left as it was.

    Every query of one rebuild sees the same data while drains keep inserting, and the named cursor
    (which needs a transaction) lives in it.
    """
    if conn.status != STATUS_READY:
        raise ConfigError("the connection is inside a transaction: commit or roll back before rebuilding")
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur.execute("SET LOCAL TimeZone TO 'UTC'")
        yield
    finally:
        if not conn.closed:
            conn.rollback()
            conn.autocommit = autocommit


def find_snapshot(
    conn: Connection, market: Market, symbol: str, at: datetime
) -> tuple[SnapshotRef, dict[str, Any]] | None:
    """The last snapshot at or before `at` (to the millisecond) and its body, or None.

    The body is what a book starts from: `lastUpdateId`, `bids`, `asks`.
    """
    return _snapshot(conn, _SNAPSHOT_SQL, {"market": market, "symbol": symbol, "before": _next_ms(at)})


def later_snapshot(
    conn: Connection, market: Market, symbol: str, at: datetime, floor: int
) -> tuple[SnapshotRef, dict[str, Any]] | None:
    """The snapshot after `at` (to the millisecond) with the least `lastUpdateId >= floor`, or None."""
    params = {"market": market, "symbol": symbol, "before": _next_ms(at), "floor": floor}
    return _snapshot(conn, _LATER_SNAPSHOT_SQL, params)


def _next_ms(at: datetime) -> datetime:
    return from_ms(to_ms(at) + 1)


def _snapshot(
    conn: Connection, sql: str, params: dict[str, Any]
) -> tuple[SnapshotRef, dict[str, Any]] | None:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    if row is None:
        return None
    last_update_id, time, bids, asks = row
    body = {"lastUpdateId": last_update_id, "bids": orjson.loads(bids), "asks": orjson.loads(asks)}
    return SnapshotRef(last_update_id, time), body


def first_snapshot(
    conn: Connection, market: Market, symbol: str
) -> tuple[SnapshotRef, dict[str, Any]] | None:
    """The first stored snapshot in time and its body, or None."""
    return _snapshot(conn, _FIRST_SNAPSHOT_SQL, {"market": market, "symbol": symbol})


def _diff(row: tuple[Any, ...]) -> Diff:
    first_u, final_u, previous_u, event_ms, bids, asks = row
    return Diff(first_u, final_u, previous_u, event_ms, _levels(bids), _levels(asks))


def _levels(text: str | None) -> list[Any]:
    return [] if text is None else orjson.loads(text)  # None: a diff read without its levels


def stream_diffs(
    conn: Connection,
    market: Market,
    symbol: str,
    from_u: int,
    since: datetime,
    until: datetime,
    batch_rows: int = DIFF_BATCH_ROWS,
) -> Generator[Diff, None, None]:
    """Diffs with `since <= E <= until` in time order, `batch_rows` per round trip; those with
    `u < from_u` (never applied to a snapshot with that id) without their levels.

    A server-side (named) cursor: PostgreSQL produces rows as they are fetched, so memory stays at
    one batch however long the range. Close the iterator (or exhaust it) to close the cursor.
    """
    params = {"market": market, "symbol": symbol, "from_u": from_u, "since": since, "until": until}
    with conn.cursor(name="collector_book_diffs") as cur:
        cur.itersize = batch_rows
        cur.execute(_DIFFS_SQL, params)
        for row in cur:
            yield _diff(row)


def next_diff(conn: Connection, market: Market, symbol: str, from_u: int, after: datetime) -> Diff | None:
    """The first stored diff with `E > after`, or None; levels as `stream_diffs` reads them."""
    with conn.cursor() as cur:
        cur.execute(_NEXT_DIFF_SQL, {"market": market, "symbol": symbol, "from_u": from_u, "after": after})
        row = cur.fetchone()
    return None if row is None else _diff(row)


def received_at(conn: Connection, market: Market, symbol: str, diff: Diff) -> datetime | None:
    """When the collector first received `diff` (the earliest copy)."""
    params = {
        "market": market,
        "symbol": symbol,
        "u": diff.u,
        "first_u": diff.U,
        "event_time": from_ms(diff.E),
    }
    with conn.cursor() as cur:
        cur.execute(_RECEIVED_SQL, params)
        row = cur.fetchone()
    return None if row is None else row[0]


def resync_snapshot(
    conn: Connection, market: Market, symbol: str, floor: int, after: datetime
) -> SnapshotRef | None:
    """The first stored snapshot at or after `after` with `lastUpdateId >= floor`, or None."""
    with conn.cursor() as cur:
        cur.execute(_RESYNC_SQL, {"market": market, "symbol": symbol, "floor": floor, "after": after})
        row = cur.fetchone()
    return None if row is None else SnapshotRef(row[0], row[1])


def ledger_gap(
    conn: Connection,
    market: Market,
    symbol: str,
    last_u: int,
    next_u: int,
    since: datetime,
    until: datetime,
) -> LedgerGap | None:
    """The `depth_gaps` row for this hole, or None; also None where the table does not exist (yet).

    The ledger only adds detail: a rebuild finds holes by checking the chain itself. A ledger that
    cannot be read (another layout) is logged and left out, within a savepoint so the transaction
    goes on.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('depth_gaps') IS NOT NULL")
        row = cur.fetchone()
        if row is None or not row[0]:
            return None
        params = {
            "market": market,
            "symbol": symbol,
            "last_u": last_u,
            "next_u": next_u,
            "since": since,
            "until": until + LEDGER_SLACK,
        }
        cur.execute("SAVEPOINT collector_book_ledger")
        try:
            cur.execute(_LEDGER_SQL, params)
        except psycopg2.ProgrammingError as error:
            cur.execute("ROLLBACK TO SAVEPOINT collector_book_ledger")
            logger.warning("book.ledger_unreadable error=%s", str(error).strip().splitlines()[0])
            return None
        found = cur.fetchone()
    return None if found is None else LedgerGap(*found)
