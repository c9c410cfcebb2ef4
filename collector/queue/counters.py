"""Counters shared by every process, kept in Redis hashes so `/metrics` can report them all.

Each counter is a hash `collector:metrics:<name>` whose fields are label values joined by `|`.
The names and labels are listed in `COUNTERS`; `/metrics` exports exactly these.
"""

from __future__ import annotations

from typing import Final, Protocol

from collector.queue import keys

# name -> (help text, label names)
COUNTERS: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "messages": ("Events received per stream", ("market", "stream")),
    "reconnects": ("WebSocket reconnects per connection", ("connection",)),
    "deadletters": ("Frames or rows sent to the dead-letter list", ("source",)),
    "rows_inserted": ("Rows inserted per table", ("table",)),
    "drain_loop_runs": ("Drain loop tasks run, by outcome (started; busy: DRAIN_LOOPS ran)", ("outcome",)),
    "rows_duplicate": ("Rows skipped as already stored, per table", ("table",)),
    "coin_m_skipped": ("All-market COIN-M rows left out, per table", ("table",)),
    "rest_requests": ("Binance REST requests by endpoint and status", ("market", "endpoint", "status")),
    "rest_errors": ("Binance REST failures by endpoint and reason", ("market", "endpoint", "reason")),
    "alerts": ("Liquidation alerts written, per rule", ("rule",)),
    "gaps": (
        "Gaps opened in the ledger, by kind (depth, stream), market and cause",
        ("kind", "market", "cause"),
    ),
}


class _HashIncr(Protocol):
    def hincrby(self, name: str, key: str, amount: int = 1) -> object: ...


def label_field(*labels: str) -> str:
    """The hash field of one label combination of a counter."""
    return "|".join(labels)


def incr(client: _HashIncr, counter: str, *labels: str, amount: int = 1) -> None:
    """Add `amount` to `counter{labels}`; works on a client or a pipeline (sync or async)."""
    if counter not in COUNTERS:
        raise KeyError(f"unknown counter {counter!r}")
    client.hincrby(keys.metric(counter), label_field(*labels), amount)
