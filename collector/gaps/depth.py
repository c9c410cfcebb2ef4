"""Diff-depth sequence checks and per-symbol resync bookkeeping. Pure: events in, decisions out.

Binance's rules (binance.md §5.3, "How to manage a local order book correctly"):
- spot: each event's `U` is the previous event's `u` + 1;
- USD-M futures: each event's `pu` is the previous event's `u` (ids may jump between events).
While one connection replaces another, both carry the stream, and either may be ahead:
- an event whose `u` is not beyond the chain, arriving on another connection than the last event,
  is a duplicate (the chain already holds those ids): neither a gap nor stored twice;
- an event of the replacement that does not link to the chain while the connection that feeds the
  chain is still open starts a *floating* chain: stored, not judged. It joins the main chain when
  the older connection catches up with it, and only if that one closes first is the hole between
  them a gap (cause `rotation`).
On one connection ids never go back, so there an older id is a break; so is an older id after the
chain's connection was lost, or across a restart (nothing overlapped: the exchange's ids went back).

A break opens a `DepthGap` (cause `sequence`, or `reconnect` / `startup` when the chain broke across
a reconnection or a restart) and asks for a snapshot of that symbol only. The gap closes when a
snapshot lines up with the chain of diffs received since the hole, by the same sync rule a client
uses to start a book: spot, a diff with `U <= lastUpdateId + 1 <= u`; futures, `U <= lastUpdateId <= u`.
A snapshot older than the start of that chain cannot line up, and another one is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from collector.gaps.records import DepthGap

Verdict = Literal["next", "duplicate", "break"]


def check(market: str, last_u: int, first_u: int, final_u: int, previous_u: int | None) -> Verdict:
    """Where one event (`U`, `u`, `pu`) stands relative to the last `u` seen for its symbol."""
    if final_u <= last_u:
        return "duplicate"
    if market == "futures":
        return "next" if previous_u == last_u else "break"
    # Spot: contiguous, or overlapping the end of what was seen (a batch that partly repeats it).
    return "next" if first_u <= last_u + 1 else "break"


def chain_base(market: str, first_u: int, previous_u: int | None) -> int:
    """The last update id before the first event of a chain: a snapshot must not be older."""
    if market == "futures" and previous_u is not None:
        return previous_u
    return first_u - 1


def covered(market: str, snapshot_id: int, last_u: int) -> bool:
    """Whether the chain, which reaches `last_u`, already holds the diff a snapshot syncs on."""
    return last_u >= snapshot_id + (1 if market == "spot" else 0)


@dataclass
class SymbolState:
    """What is known of one symbol's chain."""

    last_u: int | None = None  # the last `u` seen (None: no event yet, and none from a past run)
    last_source: str = ""  # the connection that delivered it
    # Chains of replacement connections not linked to the main one yet: source -> (base, first U, last u).
    floating: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    pending_cause: str | None = None  # a reconnect/restart happened since the last event
    # The chain's connection was lost, or this state is a past run's: nothing overlaps the next
    # event, so an id that does not advance is a break, not a repeat.
    repeat_is_break: bool = False
    base: int | None = None  # chain_base of the chain received since the last break
    open_gaps: list[DepthGap] = field(default_factory=list)
    snapshot_id: int | None = None  # a lined-up candidate waiting for the chain to reach it
    wanted: bool = False  # a snapshot should be fetched (and none is in flight)
    in_flight: bool = False


@dataclass
class Decisions:
    """What the caller must do after one call: queue these records, fetch these snapshots."""

    records: list[DepthGap] = field(default_factory=list)
    fetch: list[tuple[str, str]] = field(default_factory=list)  # (market, symbol)
    duplicate: bool = False  # the event repeats one already delivered by another connection


# The answers of the common case, shared: callers only read them (no allocation per event).
NOTHING: Final = Decisions()
DUPLICATE: Final = Decisions(duplicate=True)


class DepthTracker:
    """Follows every (market, symbol) chain across connections, reconnections and restarts."""

    def __init__(
        self, last_update_ids: dict[tuple[str, str], int] | None = None, after_crash: bool = False
    ) -> None:
        # After a crash the previous run's last ids are unknown: each symbol's first event opens a
        # gap (cause `crash`) with no lower bound, and a resync.
        self.after_crash = after_crash
        # From the previous run (Redis): a restart is then checked for continuity like a reconnect.
        self.symbols: dict[tuple[str, str], SymbolState] = {
            key: SymbolState(last_u=u, pending_cause="startup", repeat_is_break=True)
            for key, u in (last_update_ids or {}).items()
        }
        self.open_sources: set[str] = set()  # physical connections delivering now

    def state(self, market: str, symbol: str) -> SymbolState:
        key = (market, symbol)
        found = self.symbols.get(key)
        if found is None:
            found = self.symbols[key] = SymbolState()
        return found

    def chain_lost(self, market: str, symbols: list[str]) -> None:
        """The connection carrying these symbols' depth stopped receiving (not a replacement's handover)."""
        for symbol in symbols:
            state = self.symbols.get((market, symbol))
            if state is not None:
                state.repeat_is_break = True

    def reconnected(self, market: str, symbols: list[str]) -> None:
        """The connection carrying these symbols' depth was lost and opened again (or opened first
        after a restart, which stays the cause: the ids saved at the stop are what it follows)."""
        for symbol in symbols:
            state = self.state(market, symbol)
            if state.last_u is not None:
                state.pending_cause = state.pending_cause or "reconnect"

    def on_event(
        self,
        market: str,
        symbol: str,
        first_u: int,
        final_u: int,
        previous_u: int | None,
        now_us: int,
        source: str = "",
    ) -> Decisions:
        state = self.symbols.get((market, symbol)) or self.state(market, symbol)
        if state.last_u is None:  # the first event of a new recording: nothing before it was expected
            state.last_u, state.base = final_u, chain_base(market, first_u, previous_u)
            state.last_source = source
            if not self.after_crash:
                return NOTHING
            gap = DepthGap(market, symbol, now_us, None, first_u, "crash")
            state.open_gaps.append(gap)
            state.in_flight = True
            return Decisions(records=[gap], fetch=[(market, symbol)])
        if state.floating:
            floating = state.floating.get(source)
            if floating is not None:  # a replacement ahead of the main chain: follow it apart
                state.floating[source] = (floating[0], floating[1], max(floating[2], final_u))
                return NOTHING
        verdict = check(market, state.last_u, first_u, final_u, previous_u)
        if verdict == "next" and not state.open_gaps and not state.floating:
            state.last_u, state.last_source, state.pending_cause = final_u, source, None
            state.repeat_is_break = False
            return NOTHING  # the common case: the chain goes on
        # A repeat is only possible while a replacement overlaps the connection it replaces. After
        # the chain's connection was lost, or across a restart, nothing overlapped: older ids mean the
        # exchange's ids went back (it restarted), a break to record and resync, never events to drop.
        if verdict == "duplicate" and source != state.last_source and not state.repeat_is_break:
            return DUPLICATE
        if verdict == "break" and source != state.last_source and state.last_source in self.open_sources:
            state.floating[source] = (chain_base(market, first_u, previous_u), first_u, final_u)
            return NOTHING
        decisions = Decisions()
        state.last_source, state.repeat_is_break = source, False
        if verdict != "next":  # a hole, or ids going back on one connection
            gap = DepthGap(market, symbol, now_us, state.last_u, first_u, state.pending_cause or "sequence")
            state.open_gaps.append(gap)
            decisions.records.append(gap)
            state.base = chain_base(market, first_u, previous_u)
            state.snapshot_id = None  # a candidate from before this break is older than the new chain
            if not state.in_flight:
                state.wanted = True
        state.pending_cause = None
        state.last_u = final_u
        self._join_floating(state)
        final_u = state.last_u
        if state.open_gaps and state.snapshot_id is not None and covered(market, state.snapshot_id, final_u):
            self._close(state, state.snapshot_id, now_us, decisions)
        if state.wanted and not state.in_flight:
            state.wanted, state.in_flight = False, True
            decisions.fetch.append((market, symbol))
        return decisions

    @staticmethod
    def _join_floating(state: SymbolState) -> None:
        """A replacement's chain whose start the main chain has reached becomes the main chain."""
        for source, (base, _, last_u) in list(state.floating.items()):
            if state.last_u is not None and state.last_u >= base:
                del state.floating[source]
                if last_u > state.last_u:
                    state.last_u, state.last_source = last_u, source

    def source_opened(self, source: str) -> None:
        self.open_sources.add(source)

    def source_closed(self, source: str, now_us: int) -> Decisions:
        """A physical connection closed: chains waiting for it to catch up now start after a hole."""
        self.open_sources.discard(source)
        decisions = Decisions()
        for (market, symbol), state in self.symbols.items():
            if state.last_source != source or not state.floating:
                continue
            successor, (base, first_u, last_u) = max(state.floating.items(), key=lambda item: item[1][2])
            del state.floating[successor]
            gap = DepthGap(market, symbol, now_us, state.last_u, first_u, "rotation")
            state.open_gaps.append(gap)
            decisions.records.append(gap)
            state.base, state.snapshot_id = base, None
            state.last_u, state.last_source = last_u, successor
            if not state.in_flight:
                state.in_flight = True
                decisions.fetch.append((market, symbol))
        return decisions

    def forget(self, market: str, symbol: str) -> list[DepthGap]:
        """Stop following a symbol (delisted, or listed anew); returns the gaps it left open."""
        state = self.symbols.pop((market, symbol), None)
        return [] if state is None else state.open_gaps

    def on_snapshot(self, market: str, symbol: str, snapshot_id: int | None, now_us: int) -> Decisions:
        """A resync snapshot was stored (its lastUpdateId), or its fetch failed (None)."""
        decisions = Decisions()
        state = self.symbols.get((market, symbol))
        if state is None:
            return decisions  # forgotten meanwhile: no more snapshots for it
        state.in_flight = False
        if not state.open_gaps:
            return decisions
        if snapshot_id is None or state.base is None or snapshot_id < state.base:
            decisions.fetch.append((market, symbol))  # failed, or older than the chain: once more
            state.in_flight = True
            return decisions
        if state.last_u is not None and covered(market, snapshot_id, state.last_u):
            self._close(state, snapshot_id, now_us, decisions)
        else:
            state.snapshot_id = snapshot_id  # ahead of the diffs: closes when the chain reaches it
        return decisions

    def open_gaps(self) -> list[DepthGap]:
        return [gap for state in self.symbols.values() for gap in state.open_gaps]

    @staticmethod
    def _close(state: SymbolState, snapshot_id: int, now_us: int, decisions: Decisions) -> None:
        for gap in state.open_gaps:
            gap.resynced_at_us, gap.resync_update_id = now_us, snapshot_id
            decisions.records.append(gap)
        state.open_gaps, state.snapshot_id = [], None
