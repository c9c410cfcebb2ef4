"""PostgreSQL connections with timeouts; creates the database named in DATABASE_URL when missing."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from collector.errors import ServiceUnavailable
from collector.settings import Settings


def _dsn(url: str) -> str:
    # Settings checked the URL (`check_database_url`); libpq reads `postgresql://` only, so a
    # SQLAlchemy-style `postgresql+psycopg2://` or a `postgres://` loses its own spelling here.
    return "postgresql://" + url.partition("://")[2]


def database_name(url: str) -> str:
    """The database DATABASE_URL names (Settings refused a URL without one)."""
    return urlsplit(_dsn(url)).path.lstrip("/")


def connect(settings: Settings, autocommit: bool = False) -> psycopg2.extensions.connection:
    """A connection to the collector's database; `ServiceUnavailable` in one line when unreachable."""
    try:
        conn = psycopg2.connect(
            _dsn(settings.database_url), connect_timeout=settings.database_connect_timeout_s
        )
    except psycopg2.OperationalError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "no answer"
        raise ServiceUnavailable(
            f"PostgreSQL at {_redacted(settings.database_url)} is unreachable: {reason}"
        ) from None
    conn.autocommit = autocommit
    return conn


def ensure_database(settings: Settings) -> bool:
    """Create the database of DATABASE_URL if it does not exist; True when it was created."""
    name = database_name(settings.database_url)
    parts = urlsplit(_dsn(settings.database_url))
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    try:
        conn = psycopg2.connect(maintenance, connect_timeout=settings.database_connect_timeout_s)
    except psycopg2.OperationalError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "no answer"
        raise ServiceUnavailable(
            f"PostgreSQL at {_redacted(settings.database_url)} is unreachable: {reason}"
        ) from None
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone():
                return False
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            return True
    finally:
        conn.close()


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
