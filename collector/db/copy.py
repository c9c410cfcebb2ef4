"""Write rows with COPY into a temporary staging table, then insert what is new into the real one.

`COPY` is the fastest way into PostgreSQL but cannot skip duplicates, so rows go first into a
per-session `stage_<table>` (temporary: no WAL, emptied at commit), then
`INSERT … SELECT … ON CONFLICT DO NOTHING` moves them across. A replayed batch therefore inserts
nothing twice, whatever the natural key of the table.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg2.extensions import connection as Connection

from collector.db.schema import COPY_COLUMNS, DRAINED_TABLES, NATURAL_KEYS, UPSERT_COLUMNS

# Time columns travel through staging as integer microseconds and are converted on insert,
# which is exact and keeps datetime formatting out of the Python hot loop.
_TIME_COLUMNS = {
    table.name: frozenset(c.name for c in table.columns if c.type.__class__.__name__ == "DateTime")
    for table in DRAINED_TABLES
}
_PG_TYPES = {
    "DateTime": "bigint",
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


def _staging_columns(table: str) -> str:
    definition = next(t for t in DRAINED_TABLES if t.name == table)
    types = {c.name: _PG_TYPES[c.type.__class__.__name__] for c in definition.columns}
    return ", ".join(f"{name} {types[name]}" for name in COPY_COLUMNS[table])


def _select_list(table: str) -> str:
    times = _TIME_COLUMNS[table]
    return ", ".join(
        f"TIMESTAMPTZ 'epoch' + {name} * INTERVAL '1 microsecond'" if name in times else name
        for name in COPY_COLUMNS[table]
    )


STAGING_DDL = {
    table: f"CREATE TEMP TABLE IF NOT EXISTS stage_{table} ({_staging_columns(table)}) ON COMMIT DELETE ROWS"
    for table in COPY_COLUMNS
}
COPY_SQL = {
    table: f"COPY stage_{table} ({', '.join(cols)}) FROM STDIN" for table, cols in COPY_COLUMNS.items()
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
    table: f"INSERT INTO {table} ({', '.join(cols)}) SELECT {_select_list(table)} FROM {_source(table)} "
    + _on_conflict(table)
    for table, cols in COPY_COLUMNS.items()
}

_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _field(value: Any) -> bytes:
    """One value in PostgreSQL's COPY text format."""
    if value is None:
        return b"\\N"
    if value is True:
        return b"t"
    if value is False:
        return b"f"
    if isinstance(value, bytes):  # JSON payload: escape its backslashes (it has no raw tabs/newlines)
        return value.replace(b"\\", b"\\\\")
    if isinstance(value, int):
        return str(value).encode()
    return str(value).translate(_ESCAPES).encode()


def copy_text(rows: Iterable[Sequence[Any]]) -> bytes:
    """Rows rendered as one COPY text-format buffer."""
    return b"".join(b"\t".join([_field(value) for value in row]) + b"\n" for row in rows)


def copy_rows(
    conn: Connection, table: str, rows: Sequence[Sequence[Any]], rendered: bytes | None = None
) -> CopyResult:
    """Stage `rows` and insert the new ones, inside the caller's transaction.

    The caller commits (which also empties the staging table) before staging again. `rendered`
    is `copy_text(rows)` when the caller already has it (the drain renders on its parsing thread).
    """
    if not rows:
        return CopyResult(0, 0)
    with conn.cursor() as cur:
        cur.execute(STAGING_DDL[table])
        cur.copy_expert(COPY_SQL[table], io.BytesIO(copy_text(rows) if rendered is None else rendered))
        cur.execute(INSERT_SQL[table])
        inserted = cur.rowcount
    return CopyResult(len(rows), inserted)
