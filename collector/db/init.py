"""`collector init-db`: create the database and tables, then bring TimescaleDB (or its plain
PostgreSQL stand-ins) in line with the settings. Idempotent; reports only what it changed."""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg2.extensions import cursor as Cursor
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from collector.db import timescale
from collector.db.connection import connect, database_name, ensure_database
from collector.db.schema import metadata
from collector.settings import Settings


@dataclass
class InitResult:
    timescale: bool  # TimescaleDB in use (hypertables and continuous aggregates)
    changes: list[str] = field(default_factory=list)  # one line per change, empty when none


def init_db(settings: Settings) -> InitResult:
    """Create what is missing and apply the TimescaleDB settings, in one transaction."""
    changes: list[str] = []
    if ensure_database(settings):
        changes.append(f"database {database_name(settings.database_url)} created")
    conn = connect(settings)
    try:
        with conn.cursor() as cur:
            # Serialise concurrent init-db runs (docker-compose starts several services at once).
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('collector.init_db'))")
            for table in metadata.sorted_tables:
                changes += _create_missing(cur, table)
            with_timescale, timescale_changes = timescale.apply(cur, settings)
        conn.commit()
    finally:
        conn.close()
    return InitResult(with_timescale, changes + timescale_changes)


def _create_missing(cur: Cursor, table: Table) -> list[str]:
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]  # untyped in SQLAlchemy
    lines = []
    if not _relation_exists(cur, table.name):
        cur.execute(str(CreateTable(table).compile(dialect=dialect)))
        lines.append(f"table {table.name} created")
    for index in sorted(table.indexes, key=lambda i: str(i.name)):
        if not _relation_exists(cur, str(index.name)):
            cur.execute(str(CreateIndex(index).compile(dialect=dialect)))
            lines.append(f"index {index.name} created")
    return lines


def _relation_exists(cur: Cursor, name: str) -> bool:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
    return bool(cur.fetchone()[0])
