"""`collector book`: rebuild a stored order book at a time and print it (text ladder or JSON)."""

from __future__ import annotations

import sys
from typing import TextIO

import psycopg2
import psycopg2.errors

from collector.book.rebuild import plan_book, rebuild
from collector.book.render import as_json, as_text, boundary_note
from collector.book.replay import BookUnavailable
from collector.db.connection import connect
from collector.errors import ConfigError, FrameError, ServiceUnavailable
from collector.settings import Settings

DEFAULT_DEPTH = 10


def run(
    settings: Settings,
    market: str,
    symbol: str,
    at: str,
    depth: int = DEFAULT_DEPTH,
    json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the book; a time it is not exact at raises `ConfigError` (one line saying why, exit 2).

    That is a time before any snapshot, inside a gap or after the recording (`book_at`).
    """
    out, err = out or sys.stdout, err or sys.stderr
    if depth < 0:
        raise ConfigError(f"--depth {depth}: give a number of levels a side, or 0 for all of them")
    request = plan_book(market, symbol, at)
    conn = connect(settings)
    try:
        result = rebuild(conn, request)
    except (BookUnavailable, FrameError) as error:  # FrameError: a stored row Binance would not send
        raise ConfigError(str(error)) from None
    except psycopg2.Error as error:
        raise _one_line(error) from None
    finally:
        conn.close()
    levels = depth or None
    print(as_json(result, levels) if json else as_text(result, levels), file=out)
    note = boundary_note(result)
    if note is not None:
        print(note, file=err)
    return 0


def _one_line(error: psycopg2.Error) -> Exception:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, psycopg2.OperationalError):
        return ServiceUnavailable(f"PostgreSQL failed while rebuilding the book: {first}")
    if isinstance(error, psycopg2.errors.UndefinedTable):
        return ConfigError(f"{first} (run `collector init-db`)")
    return ConfigError(f"book rebuild failed: {first}")
