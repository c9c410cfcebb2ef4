"""The book as the CLI prints it: a two-sided text ladder, or Binance-shaped JSON. Pure."""

from __future__ import annotations

import json

from collector.book.replay import BookAt, iso

_TITLES = ("bid qty", "bid", "ask", "ask qty")


def as_json(result: BookAt, depth: int | None) -> str:
    """`{"bids": [[price, qty], …], "asks": …, "last_update_id": …}`, best levels first, Binance's strings."""
    bids, asks = result.top(depth)
    return json.dumps(
        {"bids": [list(level) for level in bids], "asks": [list(level) for level in asks],
         "last_update_id": result.last_update_id}
    )  # fmt: skip


def headline(result: BookAt) -> str:
    """What the book is and where it came from, in one line."""
    snapshot = result.snapshot
    return (
        f"{result.market} {result.symbol} at {iso(result.at)}: last_update_id={result.last_update_id}"
        f" (snapshot {snapshot.last_update_id} at {iso(snapshot.time)} + {result.applied} diffs;"
        f" skipped {result.stale} stale, {result.duplicates} duplicate)"
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


def staleness_note(result: BookAt) -> str | None:
    """A warning when no stored diff after the time confirms the book, else None."""
    if result.followed:
        return None
    last = result.last_event_time or result.snapshot.time
    return (
        f"note: no diff is stored after {iso(result.at)}; the book is as of {iso(last)}"
        f" (u={result.last_update_id}) and later updates, if any, were not recorded"
    )
