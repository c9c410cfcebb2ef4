"""Sans-I/O order book: a REST snapshot plus diff-depth events under Binance's sync rules per market."""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from collector.errors import FrameError

Market = Literal["spot", "futures"]
Level = tuple[str, str]  # (price, quantity) exactly as Binance wrote them


@dataclass(frozen=True, slots=True)
class Diff:
    """One diff-depth event (`depthUpdate`), reduced to what a book needs; Binance's letters."""

    U: int  # first update id in the event
    u: int  # final update id in the event
    pu: int | None  # final update id of the previous event (futures only)
    E: int  # event time, ms
    b: Sequence[Sequence[str]]  # bids to update: [price, absolute quantity]; "0" removes the level
    a: Sequence[Sequence[str]]  # asks, likewise

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Diff:
        """From the event as Binance sends it (the `data` of a combined-stream frame)."""
        try:
            return cls(event["U"], event["u"], event.get("pu"), event["E"], event["b"], event["a"])
        except KeyError as missing:
            raise FrameError(f"depthUpdate has no {missing}") from None


class Outcome(enum.Enum):
    """What a book does with a diff."""

    APPLIED = "applied"
    STALE = "stale"  # before the first applied diff: already contained in the snapshot
    DUPLICATE = "duplicate"  # after it: u <= the book's id, e.g. the same event from a second connection
    GAP = "gap"  # does not chain onto the book: events are missing, the book cannot go on


def first_applies(market: Market, last_update_id: int, diff: Diff) -> bool:
    """Whether `diff` is the one to apply first to a snapshot with `last_update_id`.

    Spot: `U <= lastUpdateId+1 <= u`; USD-M: `U <= lastUpdateId <= u` (no +1), see binance.md §5.3
    (Binance's "How to manage a local order book correctly", spot and USD-M pages).
    """
    target = last_update_id + 1 if market == "spot" else last_update_id
    return diff.U <= target <= diff.u


def is_stale(market: Market, last_update_id: int, diff: Diff) -> bool:
    """Before the first applied diff: spot drops `u <= lastUpdateId`, USD-M drops `u < lastUpdateId`."""
    return diff.u <= last_update_id if market == "spot" else diff.u < last_update_id


def continues(market: Market, previous_u: int, diff: Diff) -> bool:
    """Whether `diff` (with `u > previous_u`) follows the book without a hole.

    Spot applies unless `U > previous u + 1`; normally `U == previous u + 1`, and an overlapping event
    is applied because quantities are absolute (spot update procedure, binance.md §5.1). USD-M ids
    are not contiguous, so the only test is `pu == previous u` (binance.md §5.2 step 6, §5.3).
    """
    if market == "spot":
        return diff.U <= previous_u + 1
    if diff.pu is None:
        raise FrameError(f"futures depthUpdate u={diff.u} has no 'pu'")
    return diff.pu == previous_u


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except (InvalidOperation, TypeError):
        raise FrameError(f"depth level value {text!r} is not a decimal string") from None


def _set_levels(side: dict[Decimal, Level], levels: Iterable[Sequence[str]]) -> None:
    for price, quantity in levels:
        if _decimal(quantity).is_zero():
            # Removing a level the book does not hold is normal (USD-M page, step 9).
            side.pop(_decimal(price), None)
        else:
            side[_decimal(price)] = (price, quantity)


class LocalBook:
    """A local order book: starts from a snapshot, then takes diffs in update-id order.

    Levels are keyed by exact `Decimal` price, so "0.3513" and "0.35130000" are one level, and keep
    Binance's strings for output. Sorting happens only in `top`. `update_id` is the snapshot's
    `lastUpdateId` until the first diff applies, then the `u` of the last applied diff.
    """

    __slots__ = ("asks", "bids", "market", "synced", "update_id")

    def __init__(
        self,
        market: Market,
        last_update_id: int,
        bids: Iterable[Sequence[str]] = (),
        asks: Iterable[Sequence[str]] = (),
    ) -> None:
        self.market: Market = market
        self.update_id = last_update_id
        self.synced = False  # True once a diff has been applied on top of the snapshot
        self.bids: dict[Decimal, Level] = {}
        self.asks: dict[Decimal, Level] = {}
        _set_levels(self.bids, bids)
        _set_levels(self.asks, asks)

    @classmethod
    def from_snapshot(cls, market: Market, body: Mapping[str, Any]) -> LocalBook:
        """From a REST depth body: `{"lastUpdateId", "bids": [[p, q], …], "asks": …}`."""
        try:
            return cls(market, body["lastUpdateId"], body["bids"], body["asks"])
        except KeyError as missing:
            raise FrameError(f"depth snapshot has no {missing}") from None

    def copy(self) -> LocalBook:
        """An independent book in the same state."""
        book = LocalBook(self.market, self.update_id)
        book.bids, book.asks, book.synced = dict(self.bids), dict(self.asks), self.synced
        return book

    def classify(self, diff: Diff) -> Outcome:
        """What `apply` would do with `diff`; the book is not changed."""
        if not self.synced:
            if is_stale(self.market, self.update_id, diff):
                return Outcome.STALE
            return Outcome.APPLIED if first_applies(self.market, self.update_id, diff) else Outcome.GAP
        if diff.u <= self.update_id:
            return Outcome.DUPLICATE
        return Outcome.APPLIED if continues(self.market, self.update_id, diff) else Outcome.GAP

    def apply(self, diff: Diff) -> Outcome:
        """Apply `diff` if it is the next one; on any other outcome the book is left as it was."""
        outcome = self.classify(diff)
        if outcome is Outcome.APPLIED:
            _set_levels(self.bids, diff.b)
            _set_levels(self.asks, diff.a)
            self.update_id = diff.u
            self.synced = True
        return outcome

    def top(self, depth: int | None = None) -> tuple[list[Level], list[Level]]:
        """(bids best first, asks best first), `depth` levels a side or all of them when None."""
        if depth is None:
            bid_prices = sorted(self.bids, reverse=True)
            ask_prices = sorted(self.asks)
        else:
            bid_prices = heapq.nlargest(depth, self.bids)
            ask_prices = heapq.nsmallest(depth, self.asks)
        return [self.bids[p] for p in bid_prices], [self.asks[p] for p in ask_prices]

    def __len__(self) -> int:
        return len(self.bids) + len(self.asks)
