"""Pure part of rebuilding a book at a time: the replay loop, its verdict, and why a book cannot be had.

- `BookUnavailable` (a `CollectorError`): no trustworthy book exists at the requested time.
  - `BeforeFirstSnapshot`: it is before the first book the stored rows give (or none is stored).
  - `InsideGap`: the stored diffs between the snapshot and the time have a hole; carries a `GapReport`.
  - `AfterRecording`: the time is after the last stored event that pins the book.

When is a book exact at a time T (all at Binance's millisecond)? When the stored rows show the
book's state at some instant S <= T and show that no update came in (S, T]. A diff pins the state
at its `E`; a snapshot at its stored time (by convention: see `book_at`). "No update in (S, T]" is
proved by the next diff in the chain having `E > T`, or by S == T: a symbol's diff events at the
speeds recorded (@100ms, @250ms, @500ms, @1000ms) never share a millisecond, so whatever follows a
diff, a hole included, has a later `E`. Several diffs of one symbol in one millisecond would break
that: a hole right after the diff at T could then hide an update of that same millisecond.
A snapshot does not pin the instant of its stored time against a hole after it: its state was
taken before it was received (or sent), and the updates lost right after that state may be older
than the stored time.

Diffs are replayed in time order (`E`, then `u`), not update-id order: an exchange that restarts may
start its ids again from lower ones (the fake exchange does, from its seed; so may a real one after
maintenance), and then only time tells the two chains apart. Within a chain ids only grow, so an id
that goes back (`u` below the highest seen) starts another chain: after the snapshot's time it is a
break like any hole; at or before it, the snapshot belongs to the newer chain, and everything
replayed before it is dropped (the book starts again from the snapshot). This assumes one depth
stream per symbol in the table: with two speeds of one symbol stored (`depth` beside `depth@100ms`),
the second speed's batches repeat ids the first has passed, which reads as ids going back, so the
book is refused there (never given wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
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
    """The time is before the first book the stored rows give (or no snapshot is stored).

    `first`: the first instant a book is known, the first snapshot's time or, earlier, the `E` of
    the diff that carries its lastUpdateId; None when no snapshot is stored.
    """

    def __init__(self, market: Market, symbol: str, at: datetime, first: datetime | None) -> None:
        self.market, self.symbol, self.at, self.first = market, symbol, at, first
        if first is None:
            text = f"no {market} {symbol} depth snapshot is stored, so no book can be rebuilt"
        else:
            text = (
                f"{iso(at)} is before the first {market} {symbol} book: the stored depth snapshots "
                f"give one from {iso(first)}"
            )
        super().__init__(text)


class InsideGap(BookUnavailable):
    """The stored diffs have a hole between the snapshot and the time; `gap` says where."""

    def __init__(self, gap: GapReport) -> None:
        self.gap = gap
        super().__init__(gap.message())


class AfterRecording(BookUnavailable):
    """The time is after the last stored event that pins the book (`as_of`), and no later diff follows.

    `next_snapshot`: a stored snapshot after the time, when the recording goes on with one (its diffs
    up to it were not stored); None when `as_of` is the last recorded event.
    """

    def __init__(
        self,
        market: Market,
        symbol: str,
        at: datetime,
        as_of: datetime,
        last_update_id: int,
        next_snapshot: SnapshotRef | None,
    ) -> None:
        self.market, self.symbol, self.at, self.as_of = market, symbol, at, as_of
        self.last_update_id, self.next_snapshot = last_update_id, next_snapshot
        if next_snapshot is None:
            text = (
                f"{iso(at)} is after the recording: the last stored {market} {symbol} depth event "
                f"is at {iso(as_of)} (u={last_update_id})"
            )
        else:
            text = (
                f"{iso(at)} is after the last stored {market} {symbol} depth event, at {iso(as_of)} "
                f"(u={last_update_id}), and before the next snapshot, at {iso(next_snapshot.time)} "
                f"(id {next_snapshot.last_update_id}): no stored row says what the book was"
            )
        super().__init__(text)


@dataclass(frozen=True)
class BookAt:
    """The book as it stood at `at`: every stored diff with `E <= at` applied to `snapshot`.

    `as_of` is the last instant the stored rows pin the book at (the `E` of the last diff it took, or
    the snapshot's time): the book is the same from `as_of` to `at`. `followed` is True when a stored
    diff after `at` chains onto the book, which proves no update between `as_of` and `at` is missing;
    otherwise `as_of == at` (to the millisecond) and either the stored diffs break right after it
    (`gap_follows`) or none is stored after it.
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
    as_of: datetime
    gap_follows: bool = False

    @property
    def last_update_id(self) -> int:
        return self.book.update_id

    def top(self, depth: int | None = None) -> tuple[list[Level], list[Level]]:
        """(bids best first, asks best first), `depth` levels a side, all when None."""
        return self.book.top(depth)


class Verdict(Enum):
    """What a finished replay says about the book at its time."""

    BOOK = "book"  # exact at the time
    GAP = "gap"  # a hole in the stored diffs may hide updates at or before the time
    AFTER = "after"  # nothing stored after `as_of`, which is before the time
    UNPINNED = "unpinned"  # the snapshot is later than the time and no diff pins it by then


class Replay:
    """Feeds stored diffs, in time order, to a book until the first one after `until_ms`.

    `feed` returns False when the replay is over: either a diff past `until_ms` chains onto the book
    (`followed`) or a diff does not chain (`gap`), and the snapshot's time is passed. Whether the book
    is exact at `until_ms` is then `verdict()`; a gap found after `until_ms` may still hide updates
    before it.

    The snapshot may be later than `until_ms` (a resync snapshot whose first diffs are older than
    its stored time): the book is then exact only from the first diff that pins it, one with
    `u >= lastUpdateId` (spot's `u == lastUpdateId`, stale as it is, shows the book equals the snapshot),
    and only if no id goes back between that diff and the snapshot's time: the replay watches the
    diffs up to the snapshot's time, and an id going back there starts it again from the snapshot.
    """

    def __init__(self, book: LocalBook, until_ms: int, snapshot: SnapshotRef) -> None:
        self._initial = book.copy()
        self.until_ms = until_ms
        self._snapshot = snapshot
        self._snapshot_ms = to_ms(snapshot.time)
        self.done = False
        self._restart(book)

    def _restart(self, book: LocalBook) -> None:
        """From the snapshot again: what was replayed so far belongs to another chain of ids."""
        self.book = book
        self.applied = 0
        self.stale = 0
        self.duplicates = 0
        self.last_event_ms: int | None = None
        self.pinned_ms: int | None = None  # E of the last diff (<= until_ms) that shows the book's state
        self.first_pin_ms: int | None = None  # E of the first diff that shows it, at any time
        self.followed = False
        self.gap: ChainBreak | None = None
        self._top_u: int | None = None  # the highest u of the chain so far

    def feed(self, diff: Diff) -> bool:
        if self._top_u is not None and diff.u < self._top_u:  # the ids went back: another chain
            if diff.E > self._snapshot_ms:
                if not self.followed:
                    self._break(diff)
                return self._stop()
            self._restart(self._initial.copy())  # the snapshot is the newer chain's
        self._top_u = diff.u if self._top_u is None else max(self._top_u, diff.u)
        if self.followed or self.gap is not None:
            # Over, unless a restart before the snapshot's time shows that this was another chain.
            return diff.E <= self._snapshot_ms or self._stop()
        outcome = self.book.classify(diff)
        if outcome is Outcome.GAP:
            self._break(diff)
            return diff.E <= self._snapshot_ms or self._stop()
        if outcome is Outcome.APPLIED:
            if self.first_pin_ms is None:
                self.first_pin_ms = diff.E
            if diff.E > self.until_ms:
                self.followed = True
                return diff.E <= self._snapshot_ms or self._stop()
            self.book.apply(diff)
            self.applied += 1
            self.last_event_ms = self.pinned_ms = diff.E
        elif outcome is Outcome.STALE:
            # Only the one ending at lastUpdateId counts: how many older ones are read depends on
            # how far back the replay reads, not on the book.
            if diff.u == self.book.update_id:  # spot's diff ending at lastUpdateId: the book is the snapshot
                self.stale += 1
                if self.first_pin_ms is None:
                    self.first_pin_ms = diff.E
                if diff.E <= self.until_ms:
                    self.pinned_ms = diff.E
        else:
            self.duplicates += 1
        return True

    def _break(self, diff: Diff) -> None:
        """`diff` does not chain onto the book: the first hole found (a later one changes nothing)."""
        if self.gap is None:
            last = self._snapshot.time if self.last_event_ms is None else from_ms(self.last_event_ms)
            self.gap = ChainBreak(self.book.update_id, last, diff)

    def _stop(self) -> bool:
        self.done = True
        return False

    @property
    def as_of_ms(self) -> int | None:
        """The last instant <= `until_ms` the stored rows pin the book at; None: none yet."""
        times = [t for t in (self.pinned_ms, self._snapshot_ms) if t is not None and t <= self.until_ms]
        return max(times) if times else None

    @property
    def gap_follows(self) -> bool:
        """A hole starts right after a diff at `until_ms` itself: the book is exact at that instant."""
        return self.gap is not None and self.gap.next.E > self.until_ms and self.pinned_ms == self.until_ms

    def verdict(self) -> Verdict:
        """Whether the book is exact at `until_ms` (see the module docstring for the rule)."""
        if self.gap is not None:
            return Verdict.BOOK if self.gap_follows else Verdict.GAP
        if self.as_of_ms is None:
            return Verdict.UNPINNED
        if self.followed or self.as_of_ms == self.until_ms:
            return Verdict.BOOK
        return Verdict.AFTER

    def result(self, symbol: str, at: datetime) -> BookAt:
        """The book at `at`; call only when `verdict()` is `BOOK`."""
        as_of = self.as_of_ms
        if self.verdict() is not Verdict.BOOK or as_of is None:
            raise RuntimeError("the replay has no exact book at its time")
        last = None if self.last_event_ms is None else from_ms(self.last_event_ms)
        return BookAt(
            self.book.market,
            symbol,
            at,
            self.book,
            self._snapshot,
            self.applied,
            self.stale,
            self.duplicates,
            last,
            self.followed,
            from_ms(as_of),
            self.gap_follows,
        )


def resync_floor(market: Market, next_first_u: int) -> int:
    """The least `lastUpdateId` of a snapshot that the diff after a hole (its U) can be applied to.

    From the first-event rules (binance.md §5.3): spot `U <= lastUpdateId+1`, USD-M `U <= lastUpdateId`.
    """
    return next_first_u - 1 if market == "spot" else next_first_u
