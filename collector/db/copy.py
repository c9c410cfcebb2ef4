"""Write a batch's rows with COPY: straight into the table, or through a staging table when it may collide.

The fast path (`copy_direct`) is a plain `COPY <table> FROM STDIN`: PostgreSQL parses each row once and
inserts it, no second pass. A COPY cannot skip a row already stored, though, so a batch that may
collide (re-delivered, or a table whose records are merged: the gap ledger's `UPSERT_COLUMNS`) goes
through the slow path (`copy_staged`): rows are COPYed into a per-session temporary `stage_<table>`
(no WAL, emptied at commit), then `INSERT … SELECT … ON CONFLICT` moves across what is new. A batch
that was expected to be new but collides all the same (the same event received twice) fails the
fast path with `UniqueViolation`; the caller rolls back and writes it through the slow path.

Both take the same buffer: rows rendered once by `render_line`, in COPY's text format, time columns
as `timestamptz` literals.
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from psycopg2.extensions import connection as Connection

from collector.db.schema import COPY_COLUMNS, DRAINED_TABLES, NATURAL_KEYS, UPSERT_COLUMNS
from collector.errors import FrameError

_PG_TYPES = {
    "DateTime": "timestamptz",
    "BigInteger": "bigint",
    "Numeric": "numeric",
    "Boolean": "boolean",
    "Text": "text",
    "JSONB": "jsonb",
}


@dataclass(frozen=True)
class CopyResult:
    staged: int
    inserted: int

    @property
    def duplicates(self) -> int:
        return self.staged - self.inserted


def _definition(table: str) -> Any:
    return next(t for t in DRAINED_TABLES if t.name == table)


def _staging_columns(table: str) -> str:
    types = {c.name: _PG_TYPES[c.type.__class__.__name__] for c in _definition(table).columns}
    return ", ".join(f"{name} {types[name]}" for name in COPY_COLUMNS[table])


STAGING_DDL = {
    table: f"CREATE TEMP TABLE IF NOT EXISTS stage_{table} ({_staging_columns(table)}) ON COMMIT DELETE ROWS"
    for table in COPY_COLUMNS
}
COPY_SQL = {
    table: f"COPY stage_{table} ({', '.join(cols)}) FROM STDIN" for table, cols in COPY_COLUMNS.items()
}
DIRECT_COPY_SQL = {
    table: f"COPY {table} ({', '.join(cols)}) FROM STDIN" for table, cols in COPY_COLUMNS.items()
}


def _on_conflict(table: str) -> str:
    """Skip a row already stored; for the gap ledger, fill in what the closing record adds."""
    updates = UPSERT_COLUMNS.get(table)
    if not updates:
        return "ON CONFLICT DO NOTHING"
    sets = ", ".join(f"{c} = COALESCE(EXCLUDED.{c}, {table}.{c})" for c in updates)
    return f"ON CONFLICT ({', '.join(NATURAL_KEYS[table])}) DO UPDATE SET {sets}"


def _source(table: str) -> str:
    """The staged rows; for the gap ledger one row per key, the most complete one, because a batch may
    hold both the opening and the closing record of a gap and DO UPDATE may touch a row only once."""
    updates = UPSERT_COLUMNS.get(table)
    if not updates:
        return f"stage_{table}"
    key = ", ".join(NATURAL_KEYS[table])
    return (
        f"(SELECT DISTINCT ON ({key}) * FROM stage_{table} ORDER BY {key}, {updates[0]} NULLS LAST) AS staged"
    )


INSERT_SQL = {
    table: f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM {_source(table)} "
    + _on_conflict(table)
    for table, cols in COPY_COLUMNS.items()
}


# --- rendering: one row, one line of COPY text ------------------------------------------------------

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_LAST_SECOND = 253_402_300_799  # 9999-12-31 23:59:59, the last second Python's datetime can write
_SECONDS: dict[int, str] = {}  # "YYYY-MM-DD HH:MM:SS." by second since the epoch
_SECONDS_KEPT = 10_000  # about 1 MB; a batch needs the few seconds its rows span


def _second(second: int) -> str:
    if not 0 <= second <= _LAST_SECOND:
        raise FrameError(f"time out of range: {second} s since the epoch")
    if len(_SECONDS) >= _SECONDS_KEPT:  # a bounded cache: a long-running worker sees every second
        _SECONDS.clear()
    text = _SECONDS[second] = (_EPOCH + datetime.timedelta(seconds=second)).strftime("%Y-%m-%d %H:%M:%S.")
    return text


def timestamp(us: int) -> str:
    """µs since the epoch as a `timestamptz` literal in UTC; `FrameError` beyond year 9999.

    Rows of one batch share their seconds, so the date and time are formatted once per second.
    """
    second, fraction = divmod(us, 1_000_000)
    prefix = _SECONDS.get(second)
    if prefix is None:
        prefix = _second(second)
    return "%s%06d+00" % (prefix, fraction)  # noqa: UP031  (faster than f-strings or format here)


_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def text(value: str) -> str:
    """A text value in COPY's text format; a plain word (the usual symbol or market) as it is."""
    return value if value.isalnum() else value.translate(_ESCAPES)


def json_text(value: bytes) -> str:
    """Compact JSON (orjson's: no raw tabs or newlines) in COPY's text format: backslashes doubled."""
    return value.decode().replace("\\", "\\\\")


# How each column type is written, `{v}` being the value: integers and decimal strings (checked by
# collector.binance.rows) as they are; NULL as \N.
_WRITERS = {
    "DateTime": "timestamp({v})",
    "BigInteger": "{v}",
    "Numeric": "{v}",
    "Boolean": "('t' if {v} else 'f')",
    "Text": "text({v})",
    "JSONB": "json_text({v})",
}


def _line_source(table: str) -> str:
    columns = {c.name: c for c in _definition(table).columns}
    values = []
    for index, name in enumerate(COPY_COLUMNS[table]):
        column = columns[name]
        value = _WRITERS[column.type.__class__.__name__].format(v=f"row[{index}]")
        if column.nullable:
            value = f"NULL if row[{index}] is None else {value}"
        values.append(value)
    template = "\\t".join(["%s"] * len(values)) + "\\n"
    return f"lambda row: '{template}' % ({', '.join(values)},)"


# One function per table, generated from its columns as namedtuple and dataclasses generate theirs:
# a row is the hot loop of the drain, and one `%` over inline expressions is about twice as fast as
# a loop over per-column functions.
_NAMESPACE = {"timestamp": timestamp, "text": text, "json_text": json_text, "NULL": "\\N"}
LINE_WRITERS: dict[str, Callable[[tuple[Any, ...]], str]] = {
    table: eval(_line_source(table), dict(_NAMESPACE))  # the source is built above from the schema
    for table in COPY_COLUMNS
}


def render_line(table: str, row: tuple[Any, ...]) -> str:
    """One row of `table` as a line of COPY text; `FrameError` for a time PostgreSQL cannot store."""
    return LINE_WRITERS[table](row)


def copy_text(table: str, rows: Iterable[tuple[Any, ...]]) -> bytes:
    """Rows of `table` rendered as one COPY text-format buffer."""
    write = LINE_WRITERS[table]
    return "".join([write(row) for row in rows]).encode()


# --- writing -------------------------------------------------------------------------------------

# psycopg2 hands a COPY buffer to libpq in reads of this size (8 KiB by default: ~170 round trips
# through Python for a batch of 5,000 trades).
_COPY_CHUNK_BYTES = 1 << 20


def copy_direct(conn: Connection, table: str, rendered: bytes, count: int) -> CopyResult:
    """COPY `count` rendered rows straight into `table`, inside the caller's transaction.

    Raises `psycopg2.errors.UniqueViolation` if any of them is already stored (or twice in the
    buffer): the caller rolls back and uses `copy_staged`.
    """
    if count:
        with conn.cursor() as cur:
            cur.copy_expert(DIRECT_COPY_SQL[table], io.BytesIO(rendered), size=_COPY_CHUNK_BYTES)
    return CopyResult(count, count)


def copy_staged(conn: Connection, table: str, rendered: bytes, count: int) -> CopyResult:
    """Stage `count` rendered rows and insert the new ones (merge, for the gap ledger), inside the
    caller's transaction. The caller commits (which also empties the staging table) before staging again.
    """
    if not count:
        return CopyResult(0, 0)
    with conn.cursor() as cur:
        cur.execute(STAGING_DDL[table])
        cur.copy_expert(COPY_SQL[table], io.BytesIO(rendered), size=_COPY_CHUNK_BYTES)
        cur.execute(INSERT_SQL[table])
        inserted = cur.rowcount
    return CopyResult(count, inserted)
