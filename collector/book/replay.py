"""Pure part of rebuilding a book at a time: the replay loop, its result, and why a book cannot be had.

- `BookUnavailable` (a `CollectorError`): no trustworthy book exists at the requested time.
  - `BeforeFirstSnapshot`: no depth snapshot is stored at or before it.
  - `InsideGap`: the stored diffs between the snapshot and the time have a hole; carries a `GapReport`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from collector.book.engine import Diff, Level, LocalBook, Market, Outcome
from collector.errors import CollectorError

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MS: Final = timedelta(milliseconds=1)


def to_ms(at: datetime) -> int:
    """Epoch milliseconds of an aware datetime, rounded down (exact: no float)."""
    return (at - EPOCH) // ONE_MS


def from_ms(ms: int) -> datetime:
    return EPOCH + ms * ONE_MS


def iso(at: datetime) -> str:
    """UTC, millisecond precision, `Z`: the form `--at` reads back."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class SnapshotRef:
    """Which stored snapshot a book started from: its `lastUpdateId` and its time (see `book_at`)."""

    last_update_id: int
    time: datetime


@dataclass(frozen=True)
class ChainBreak:
    """The first stored diff that does not chain onto the book, and the last one that did."""

    last_good_u: int  # the book's update id: the snapshot's lastUpdateId or the last applied u
    last_good_time: datetime  # E of the last applied diff, else the snapshot's time
    next: Diff  # the diff after the hole


@dataclass(frozen=True)
class GapReport:
    """A hole in the stored diffs, as the book saw it, completed from the gap ledger when it has a row."""

    market: Market
    symbol: str
    at: datetime
    last_good_u: int
    next_first_u: int  # U of the first stored diff after the hole
    detected_at: datetime | None  # ledger `detected_at`, else when the diff after the hole was received
    resynced_at: datetime | None  # time of the snapshot that closed the hole; None: not resynced yet
    resync_update_id: int | None
    cause: str | None = None  # from the ledger only

    def message(self) -> str:
        detected = f", detected at {iso(self.detected_at)}" if self.detected_at is not None else ""
        cause = f", cause: {self.cause}" if self.cause else ""
        if self.resynced_at is not None and self.resync_update_id is not None:
            resync = f"resynced at {iso(self.resynced_at)} by snapshot {self.resync_update_id}"
        else:
            resync = "no later snapshot resyncs it"
        return (
            f"{iso(self.at)} falls inside a gap of {self.market} {self.symbol} depth (last good "
            f"u={self.last_good_u}, next U={self.next_first_u}{detected}{cause}; {resync})"
        )


class BookUnavailable(CollectorError):
    """No trustworthy book exists at the requested time; the message is one line saying why."""


class BeforeFirstSnapshot(BookUnavailable):
    """The time is before the first stored depth snapshot of the symbol (or there is none)."""

    def __init__(self, market: Market, symbol: str, at: datetime, first: datetime | None) -> None:
        self.market, self.symbol, self.at, self.first = market, symbol, at, first
        if first is None:
            text = f"no {market} {symbol} depth snapshot is stored, so no book can be rebuilt"
        else:
            text = (
                f"{iso(at)} is before any snapshot: the first {market} {symbol} depth snapshot "
                f"is at {iso(first)}"
            )
        super().__init__(text)


class InsideGap(BookUnavailable):
    """The stored diffs have a hole between the snapshot and the time; `gap` says where."""

    def __init__(self, gap: GapReport) -> None:
        self.gap = gap
        super().__init__(gap.message())


@dataclass(frozen=True)
class BookAt:
    """The book as it stood at `at`: every stored diff with `E <= at` applied to `snapshot`.

    `followed` is True when a stored diff after `at` chains onto the book, which proves no update
    between the last applied diff and `at` is missing. When False the recording ends (or the symbol
    went quiet) before any later diff: the book is as of `last_event_time`.
    """

    market: Market
    symbol: str
    at: datetime
    book: LocalBook
    snapshot: SnapshotRef
    applied: int
    stale: int
    duplicates: int
    last_event_time: datetime | None  # E of the last applied diff; None: the snapshot alone
    followed: bool

    @property
    def last_update_id(self) -> int:
        return self.book.update_id

    def top(self, depth: int | None = None) -> tuple[list[Level], list[Level]]:
        """(bids best first, asks best first), `depth` levels a side, all when None."""
        return self.book.top(depth)


class Replay:
    """Feeds stored diffs, in `u` order, to a book until the first one after `until_ms`.

    `feed` returns False when the replay is over: either a diff past `until_ms` chains onto the book
    (`followed`) or a diff does not chain (`gap`). A gap found just after `until_ms` still counts:
    the missing updates lie between the last good diff and that one, and may be before `until_ms`.
    """

    def __init__(self, book: LocalBook, until_ms: int, start_time: datetime) -> None:
        self.book = book
        self.until_ms = until_ms
        self.applied = 0
        self.stale = 0
        self.duplicates = 0
        self.last_event_ms: int | None = None
        self.followed = False
        self.gap: ChainBreak | None = None
        self._start_time = start_time

    def feed(self, diff: Diff) -> bool:
        outcome = self.book.classify(diff)
        if outcome is Outcome.GAP:
            last = self._start_time if self.last_event_ms is None else from_ms(self.last_event_ms)
            self.gap = ChainBreak(self.book.update_id, last, diff)
            return False
        if outcome is Outcome.APPLIED:
            if diff.E > self.until_ms:
                self.followed = True
                return False
            self.book.apply(diff)
            self.applied += 1
            self.last_event_ms = diff.E
        elif outcome is Outcome.STALE:
            self.stale += 1
        else:
            self.duplicates += 1
        return True

    @property
    def done(self) -> bool:
        return self.followed or self.gap is not None

    def result(self, symbol: str, at: datetime, snapshot: SnapshotRef) -> BookAt:
        """The book at `at`; call only when there is no gap."""
        if self.gap is not None:
            raise RuntimeError("a replay that hit a gap has no book")
        last = None if self.last_event_ms is None else from_ms(self.last_event_ms)
        return BookAt(
            self.book.market,
            symbol,
            at,
            self.book,
            snapshot,
            self.applied,
            self.stale,
            self.duplicates,
            last,
            self.followed,
        )


def resync_floor(market: Market, next_first_u: int) -> int:
    """The least `lastUpdateId` of a snapshot that the diff after a hole (its U) can be applied to.

    From the first-event rules (binance.md §5.3): spot `U <= lastUpdateId+1`, USD-M `U <= lastUpdateId`.
    """
    return next_first_u - 1 if market == "spot" else next_first_u
