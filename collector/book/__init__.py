"""Order books at any instant, rebuilt from the stored snapshots and diffs (`collector book`).

Layers, pure first:
- `engine`: `LocalBook` and `Diff`, Binance's sync rules per market (binance.md §5), no I/O.
- `replay`: the replay loop up to a time, when its book is exact, its result `BookAt`, and the
  `BookUnavailable` errors (`BeforeFirstSnapshot`, `InsideGap` with its `GapReport`, `AfterRecording`).
- `store`: the PostgreSQL reads; diffs come through a named cursor, one batch at a time.
- `rebuild`: `book_at(conn, market, symbol, at)`, the one entry point for notebooks.
- `render` and `command`: what `collector book` prints.

Time is the exchange's: a diff counts from its `E`, a snapshot from its `E` (USD-M) or, lacking one,
its receive time (spot). For example::

    import psycopg2
    from collector.book import book_at

    result = book_at(psycopg2.connect(url), "futures", "BTCUSDT", "2026-11-24T16:00:00")
    bids, asks = result.top(20)  # exact at that time; `result.as_of`: the last event it reflects
"""

from __future__ import annotations

from collector.book.engine import Diff, LocalBook, Outcome
from collector.book.rebuild import BookRequest, book_at, plan_book, rebuild
from collector.book.replay import (
    AfterRecording,
    BeforeFirstSnapshot,
    BookAt,
    BookUnavailable,
    GapReport,
    InsideGap,
    SnapshotRef,
)

__all__ = [
    "AfterRecording",
    "BeforeFirstSnapshot",
    "BookAt",
    "BookRequest",
    "BookUnavailable",
    "Diff",
    "GapReport",
    "InsideGap",
    "LocalBook",
    "Outcome",
    "SnapshotRef",
    "book_at",
    "plan_book",
    "rebuild",
]
