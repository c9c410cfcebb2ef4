"""`collector init-db`: create the database, the tables and (with TimescaleDB) the hypertables."""

from __future__ import annotations

import logging

from collector.db import timescale
from collector.db.connection import connect, ensure_database
from collector.db.schema import metadata
from collector.settings import Settings

logger = logging.getLogger(__name__)


def init_db(settings: Settings) -> bool:
    """Create everything that is missing; idempotent. Returns True when TimescaleDB is in use."""
    if ensure_database(settings):
        logger.info("initdb.database_created")
    conn = connect(settings)
    try:
        with conn.cursor() as cur:
            # Serialise concurrent init-db runs (docker-compose starts several services at once).
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('collector.init_db'))")
            for table in metadata.sorted_tables:
                for statement in _create_statements(table):
                    cur.execute(statement)
            with_timescale = timescale.apply(cur, settings)
        conn.commit()
    finally:
        conn.close()
    logger.info("initdb.done timescale=%s", with_timescale)
    return with_timescale


def _create_statements(table: object) -> list[str]:
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    dialect = postgresql.dialect()
    create = str(CreateTable(table, if_not_exists=True).compile(dialect=dialect))  # type: ignore[arg-type]
    indexes = [
        str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect))
        for index in table.indexes  # type: ignore[attr-defined]
    ]
    return [create, *indexes]
