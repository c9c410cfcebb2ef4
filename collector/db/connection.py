"""PostgreSQL connections with timeouts; creates the database named in DATABASE_URL when missing."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from collector.errors import ServiceUnavailable
from collector.settings import Settings, redacted_url


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
        raise postgres_unavailable(settings, error) from None
    conn.autocommit = autocommit
    return conn


def check_postgres(settings: Settings) -> None:
    """Raise `ServiceUnavailable` with one line when the collector's database does not answer."""
    connect(settings).close()


def postgres_unavailable(settings: Settings, error: psycopg2.OperationalError) -> ServiceUnavailable:
    """One line for a failed connection: PostgreSQL, its URL without the password, why and what to do."""
    return ServiceUnavailable(
        f"PostgreSQL at {redacted_url(settings.database_url)} {describe_postgres_error(str(error))}"
    )


def describe_postgres_error(message: str) -> str:
    """`is unreachable: … (start PostgreSQL, or set DATABASE_URL)` or `refused …: … (<what to fix>)`
    from libpq's message (its first line; the second is a hint for C programmers). Pure."""
    reason = message.strip().splitlines()[0] if message.strip() else "no answer"
    # libpq: 'connection to server at "h", port p failed: FATAL:  <what the server said>'
    said = reason.partition("FATAL:")[2].strip()
    if not said:
        return f"is unreachable: {reason} (start PostgreSQL, or set DATABASE_URL)"
    if "starting up" in said or "shutting down" in said or "recovery" in said:
        return f"is not ready: {said} (wait for it, then try again)"
    if "database" in said and "does not exist" in said:
        fix = "run `collector init-db`, or set DATABASE_URL"
    elif "password" in said or "role" in said or "authentication" in said:
        fix = "check the user and password in DATABASE_URL"
    else:
        fix = "see the PostgreSQL server's log"
    return f"refused the connection: {said} ({fix})"


def ensure_database(settings: Settings) -> bool:
    """Create the database of DATABASE_URL if it does not exist; True when it was created."""
    name = database_name(settings.database_url)
    parts = urlsplit(_dsn(settings.database_url))
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    try:
        conn = psycopg2.connect(maintenance, connect_timeout=settings.database_connect_timeout_s)
    except psycopg2.OperationalError as error:
        raise postgres_unavailable(settings, error) from None
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
