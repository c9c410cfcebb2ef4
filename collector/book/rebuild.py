"""The book at a time from the database: last snapshot at or before it, then the stored diffs after it."""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg2.extensions import connection as Connection

from collector.book import store
from collector.book.engine import LocalBook, Market
from collector.book.replay import (
    AfterRecording,
    BeforeFirstSnapshot,
    BookAt,
    ChainBreak,
    GapReport,
    InsideGap,
    Replay,
    SnapshotRef,
    Verdict,
    from_ms,
    resync_floor,
    to_ms,
)
from collector.errors import ConfigError
from collector.export.plan import parse_time
from collector.settings import SYMBOL_PATTERN

MARKETS: tuple[Market, ...] = ("spot", "futures")


@dataclass(frozen=True)
class BookRequest:
    """A checked request: a known market, an upper-case Binance symbol, an aware UTC time."""

    market: Market
    symbol: str
    at: datetime


def plan_book(market: str, symbol: str, at: str | datetime, option: str = "--at") -> BookRequest:
    """Check the arguments; `ConfigError` in one line on the first bad one. A naive `at` is UTC."""
    if market not in MARKETS:
        raise ConfigError(f"market {market!r}: one of {', '.join(MARKETS)}")
    checked: Market = "spot" if market == "spot" else "futures"
    symbol = symbol.strip().upper()  # Binance stores symbols upper-case
    if not SYMBOL_PATTERN.match(symbol):
        raise ConfigError(f"symbol {symbol!r} is not a Binance symbol (like BTCUSDT)")
    if isinstance(at, str):
        when = parse_time(at, option)
    else:
        when = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return BookRequest(checked, symbol, when)


def book_at(
    conn: Connection,
    market: str,
    symbol: str,
    at: str | datetime,
    *,
    batch_rows: int = store.DIFF_BATCH_ROWS,
) -> BookAt:
    """The order book of `symbol` on `market` as it stood at `at`.

    `at` is exchange time, to the millisecond: diffs count by their event time `E`; a snapshot
    counts from the millisecond of its `E` (USD-M bodies carry one) or else of its receive time
    (spot bodies carry no time). `at` may be an aware datetime (naive means UTC) or text as `--at`
    takes it (ISO 8601 or epoch ms).

    The book starts from the last stored snapshot at or before `at` in time, then takes the stored
    diffs with `E <= at` in time order under the market's sync rule: stale diffs are dropped, a second
    copy of an event (two connections) is skipped, and an update id that goes back (the exchange
    restarted its ids) is a break like any hole. Ids are never compared across such a break. The
    result is exact: a time the stored rows do not pin raises a `BookUnavailable` (rule:
    `collector.book.replay`):

    - `InsideGap` for a time strictly after the last diff before a hole in the stored diffs and
      before the first diff that pins the resync snapshot (which may be older than the snapshot's
      own time; from then on the book starts from that snapshot). At the last diff's own `E` the book
      is given: the missing updates come after it, as a symbol's diffs never share a millisecond
      at the speeds Binance offers (several diffs in one millisecond would make that instant unsafe).
      A hole right after the snapshot itself refuses the snapshot's time too.
    - `AfterRecording` for a time after the last stored event that pins the book, when no later
      diff shows that nothing changed meanwhile (the recording ends, or its diffs pause).
    - `BeforeFirstSnapshot` when no snapshot is at or before `at` and the first one is not pinned by
      a diff at or before `at` either; it names the first instant the book is known.

    Reads run in one read-only transaction on `conn` (which must not be inside one), and the diffs
    arrive through a server-side cursor `batch_rows` at a time: memory is bounded by the book and
    one batch, not by the length of the range.
    """
    return rebuild(conn, plan_book(market, symbol, at, option="at"), batch_rows=batch_rows)


def rebuild(conn: Connection, request: BookRequest, *, batch_rows: int = store.DIFF_BATCH_ROWS) -> BookAt:
    """`book_at` for a checked request."""
    with store.read_transaction(conn):
        return _rebuild(conn, request, batch_rows)


def _rebuild(conn: Connection, request: BookRequest, batch_rows: int) -> BookAt:
    market, symbol, at = request.market, request.symbol, request.at
    found = store.find_snapshot(conn, market, symbol, at)
    if found is None:
        first = _later_replay(conn, request, 0, batch_rows)
        if first is not None and first.verdict() is Verdict.BOOK:
            return first.result(symbol, at)
        if first is not None and first.gap is not None and first.pinned_ms is not None:
            raise InsideGap(gap_report(conn, request, first.gap))  # known before `at`, then a hole
        raise BeforeFirstSnapshot(market, symbol, at, _first_book_time(conn, request, batch_rows))
    replay = _replay(conn, request, *found, batch_rows)
    verdict = replay.verdict()
    if verdict is Verdict.BOOK:
        return replay.result(symbol, at)
    if replay.gap is not None:
        # Before its stored time, the resync snapshot may already be pinned by a diff at or before `at`.
        resynced = _later_replay(conn, request, resync_floor(market, replay.gap.next.U), batch_rows)
        if resynced is not None and resynced.verdict() is Verdict.BOOK:
            return resynced.result(symbol, at)
        raise InsideGap(gap_report(conn, request, replay.gap))
    as_of = replay.as_of_ms
    if verdict is not Verdict.AFTER or as_of is None:  # a snapshot at or before `at` always pins
        raise RuntimeError(f"book replay ended as {verdict} from a snapshot at or before the time")
    later = store.later_snapshot(conn, market, symbol, at, 0)
    raise AfterRecording(
        market,
        symbol,
        at,
        from_ms(as_of),
        replay.book.update_id,
        later[0] if later is not None else None,
    )


def _replay(
    conn: Connection, request: BookRequest, snapshot: SnapshotRef, body: dict[str, Any], batch_rows: int
) -> Replay:
    """Replay the stored diffs onto `snapshot` up to the request's time, and one beyond it if stored."""
    market, symbol, at = request.market, request.symbol, request.at
    replay = Replay(LocalBook.from_snapshot(market, body), to_ms(at), snapshot)
    # Past the snapshot's time too: up to it, an id going back would show the snapshot is of a
    # newer chain than the diffs that seemed to pin it.
    window_end = max(at, snapshot.time) + store.DIFF_LOOKAHEAD
    since = snapshot.time - store.DIFF_LOOKBACK
    from_u = snapshot.last_update_id
    diffs = store.stream_diffs(conn, market, symbol, from_u, since, window_end, batch_rows)
    with closing(diffs):
        for diff in diffs:
            if not replay.feed(diff):
                break
    if not replay.done:
        # The window ended without a later diff: look further for the next one, which tells a
        # quiet market (it chains) from a hole spanning `at` (it does not, or its ids go back).
        after = store.next_diff(conn, market, symbol, from_u, window_end)
        if after is not None:
            replay.feed(after)
    return replay


def _later_replay(conn: Connection, request: BookRequest, floor: int, batch_rows: int) -> Replay | None:
    """The replay up to the time from the first snapshot after it with `lastUpdateId >= floor`; a
    book when a diff at or before the time pins that snapshot. None: no such snapshot close enough.

    A snapshot is stored when it arrives (spot) or sent (USD-M), after the state it holds: the diff
    that carries its `lastUpdateId` can be older. Its state cannot be older than `DIFF_LOOKBACK`.
    """
    found = store.later_snapshot(conn, request.market, request.symbol, request.at, floor)
    if found is None or found[0].time - request.at > store.DIFF_LOOKBACK:
        return None
    return _replay(conn, request, *found, batch_rows)


def _first_book_time(conn: Connection, request: BookRequest, batch_rows: int) -> datetime | None:
    """The first instant a book is known: the first snapshot's time, or the diff before it that
    carries its lastUpdateId; None when no snapshot is stored."""
    first = store.first_snapshot(conn, request.market, request.symbol)
    if first is None:
        return None
    snapshot = first[0]
    replay = _replay(conn, BookRequest(request.market, request.symbol, snapshot.time), *first, batch_rows)
    pinned = replay.first_pin_ms
    return snapshot.time if pinned is None or pinned >= to_ms(snapshot.time) else from_ms(pinned)


def gap_report(conn: Connection, request: BookRequest, gap: ChainBreak) -> GapReport:
    """Where the hole is, when it was seen and which snapshot closed it: the ledger's row when it
    has one, else derived from the stored rows (detection = receipt of the diff after the hole)."""
    market, symbol = request.market, request.symbol
    seen = store.received_at(conn, market, symbol, gap.next)
    ledger = store.ledger_gap(
        conn, market, symbol, gap.last_good_u, gap.next.U, gap.last_good_time, seen or gap.last_good_time
    )
    resync = store.resync_snapshot(
        conn, market, symbol, resync_floor(market, gap.next.U), from_ms(gap.next.E)
    )
    resynced_at = resync.time if resync is not None else None
    resync_id = resync.last_update_id if resync is not None else None
    if ledger is not None and ledger.resynced_at is not None and ledger.resync_update_id is not None:
        resynced_at, resync_id = ledger.resynced_at, ledger.resync_update_id
    return GapReport(
        market,
        symbol,
        request.at,
        gap.last_good_u,
        gap.next.U,
        ledger.detected_at if ledger is not None else seen,
        resynced_at,
        resync_id,
        ledger.cause if ledger is not None else None,
    )
