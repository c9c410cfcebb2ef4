"""The book as the CLI prints it: a headline and a two-sided ladder, or JSON with the same facts. Pure."""

from __future__ import annotations

import json

from collector.book.replay import BookAt, iso

_TITLES = ("bid qty", "bid", "ask", "ask qty")


def as_json(result: BookAt, depth: int | None) -> str:
    """What the book is, where it came from, then `bids` and `asks` best first, in Binance's strings.

    Times are ISO 8601 UTC to the millisecond (`iso`), the form `--at` reads back.
    """
    bids, asks = result.top(depth)
    snapshot = result.snapshot
    return json.dumps(
        {
            "market": result.market,
            "symbol": result.symbol,
            "at": iso(result.at),
            "as_of": iso(result.as_of),
            "last_update_id": result.last_update_id,
            "snapshot": {"last_update_id": snapshot.last_update_id, "time": iso(snapshot.time)},
            "diffs_applied": result.applied,
            "diffs_skipped": {"stale": result.stale, "duplicate": result.duplicates},
            "bids": [list(level) for level in bids],
            "asks": [list(level) for level in asks],
        }
    )


def headline(result: BookAt) -> str:
    """What the book is and where it came from, in one line: the facts `as_json` gives."""
    snapshot = result.snapshot
    return (
        f"{result.market} {result.symbol} at {iso(result.at)}: last_update_id={result.last_update_id}"
        f" as of {iso(result.as_of)}, from snapshot {snapshot.last_update_id} at {iso(snapshot.time)}"
        f" + {result.applied} diffs (skipped {result.stale} stale, {result.duplicates} duplicate)"
    )


def as_text(result: BookAt, depth: int | None) -> str:
    """The headline, then bids and asks side by side: `bid qty  bid | ask  ask qty`, best first."""
    bids, asks = result.top(depth)
    blank = ("", "")
    rows = [
        (bid[1], bid[0], ask[0], ask[1])
        for bid, ask in (
            (bids[i] if i < len(bids) else blank, asks[i] if i < len(asks) else blank)
            for i in range(max(len(bids), len(asks)))
        )
    ]
    widths = [max(len(text) for text in column) for column in zip(_TITLES, *rows, strict=False)]
    lines = [headline(result)]
    if not rows:
        return "\n".join([*lines, "(the book is empty)"])
    bid_qty, bid, ask, ask_qty = widths
    for cells in (_TITLES, *rows):
        lines.append(f"{cells[0]:>{bid_qty}}  {cells[1]:>{bid}} | {cells[2]:<{ask}}  {cells[3]:>{ask_qty}}")
    return "\n".join(lines)


def boundary_note(result: BookAt) -> str | None:
    """A warning when the book is exact at its time only, not after it (nothing stored proves it
    unchanged after), else None."""
    if result.followed:
        return None
    if result.gap_follows:
        return (
            f"note: the stored diffs break right after {iso(result.as_of)} (u={result.last_update_id}):"
            " the book is exact at that instant, not after it"
        )
    return (
        f"note: no stored diff follows {iso(result.as_of)}:"
        " the book is exact at that instant, later ones are unknown"
    )
