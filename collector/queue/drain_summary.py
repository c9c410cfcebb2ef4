"""The drains' summary per table, shared by every worker process (`keys.drain_summary`).

A table is drained by whichever pool process takes the next run: every run adds its numbers to the
table's shared summary (`collector.queue.summary`), and the run that finds it due logs the totals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import redis

from collector.queue import keys
from collector.queue.summary import SharedSummary

# What a run adds to the summary, in the order of `DrainTotals`' counts.
# `filtered`: rows left out before the insert (COIN-M), the FILTERED of `collector audit`.
FIELDS: Final = ("runs", "envelopes", "inserted", "duplicates", "filtered", "dead_letters")


@dataclass(frozen=True)
class DrainTotals:
    """What every process's drains of one table did over `over_s` seconds."""

    over_s: float
    runs: int
    envelopes: int
    inserted: int
    duplicates: int
    filtered: int  # rows left out before the insert (COIN-M rows, KEEP_COIN_M_ROWS=false)
    dead_letters: int


class DrainSummaries:
    """Adds drain runs to their table's shared summary, and hands out the totals when one is due."""

    def __init__(self, client: redis.Redis) -> None:
        self._summary = SharedSummary(client)

    def add_run(
        self, table: str, run: Mapping[str, int], now_us: int, interval_s: float, take_now: bool = False
    ) -> DrainTotals | None:
        """Add `run` (amounts by `FIELDS` name) to `table`'s summary.

        Returns the totals, this run included, when `interval_s` has passed since the summary began
        or `take_now`; then the next summary begins at `now_us`. Otherwise None.
        """
        taken = self._summary.add(
            keys.drain_summary(table),
            {name: int(run.get(name, 0)) for name in FIELDS},
            now_us,
            interval_s,
            take_now,
        )
        if taken is None:
            return None
        over_s, totals = taken
        return DrainTotals(over_s, *(totals.get(name, 0) for name in FIELDS))
