"""Every event accounted for: envelope sequence numbers, drained ranges, and the holes between them.

The stream process numbers the envelopes it queues, per table, within its run
(`"run":"<id>","seq":<n>` in the envelope head; `collector.streams.sink`). Each drain batch records,
in the same transaction as its rows, the contiguous ranges of numbers it consumed (stored,
duplicate, filtered or dead-lettered alike) in `ingest_ranges`. Queues are first in, first out, so
once later numbers of a run are drained, a number never drained was lost between the stream process
and PostgreSQL: Redis lost it (a restart without persistence, a FLUSHALL, an eviction). The loss is
reported with its exact count and the receive times around it.

Envelopes of the REST tasks and the gap ledger carry no number and are not audited here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from psycopg2.extensions import cursor as Cursor

logger = logging.getLogger(__name__)

# The head `make_envelope` writes: market, receive time, then the audit tag.
AUDIT_TAG: Final = re.compile(rb'^\{"market":"\w+","received_at_us":(\d+),"run":"([\w.-]+)","seq":(\d+),')
HEAD_BYTES: Final = 160


@dataclass(frozen=True)
class SeqRange:
    """Envelopes `first..last` of one run, drained together, and when the first and last were received."""

    run: str
    first: int
    last: int
    first_received_us: int
    last_received_us: int


@dataclass(frozen=True)
class Loss:
    """Envelopes queued by the stream process that never reached PostgreSQL."""

    table: str
    run: str
    first: int
    last: int
    after_received: datetime  # the receive time of the last envelope drained before the hole
    before_received: datetime  # ... and of the first one after it

    @property
    def count(self) -> int:
        return self.last - self.first + 1


def tag_of(raw: bytes) -> tuple[str, int, int] | None:
    """(run, seq, received_at_us) of an audited envelope, None for the others. Pure."""
    match = AUDIT_TAG.match(raw, 0, HEAD_BYTES)
    if match is None:
        return None
    return match.group(2).decode(), int(match.group(3)), int(match.group(1))


def contiguous_ranges(tags: Iterable[tuple[str, int, int]]) -> list[SeqRange]:
    """The tags of one batch as contiguous ranges per run (a batch is normally one range). Pure."""
    ranges: list[SeqRange] = []
    for run, seq, received in sorted(tags):
        last = ranges[-1] if ranges else None
        if last is not None and last.run == run and seq <= last.last + 1:
            ranges[-1] = SeqRange(run, last.first, max(seq, last.last), last.first_received_us, received)
        else:
            ranges.append(SeqRange(run, seq, seq, received, received))
    return ranges


INSERT_RANGES: Final = (
    "INSERT INTO ingest_ranges (table_name, run, first_seq, last_seq, first_received_at, last_received_at)"
    " VALUES (%s, %s, %s, %s, TIMESTAMPTZ 'epoch' + %s * INTERVAL '1 microsecond',"
    " TIMESTAMPTZ 'epoch' + %s * INTERVAL '1 microsecond')"
)

# Holes between the drained ranges of each run and table: the next range starts beyond the highest
# number drained before it. Redelivered batches overlap (never a hole), hence the running maximum.
HOLES_SQL: Final = """
WITH ordered AS (
    SELECT table_name, run, first_seq, first_received_at,
           max(last_seq) OVER w AS previous_last,
           max(last_received_at) OVER w AS previous_received
    FROM ingest_ranges
    WHERE last_received_at >= %(since)s {table_filter}
    WINDOW w AS (PARTITION BY table_name, run ORDER BY first_seq
                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
)
SELECT table_name, run, previous_last + 1, first_seq - 1, previous_received, first_received_at
FROM ordered
WHERE first_seq > previous_last + 1
ORDER BY first_received_at
"""


def record_ranges(cur: Cursor, table: str, ranges: list[SeqRange]) -> None:
    """Inside the batch's transaction; logs a hole before the first range (the loss, as it is found)."""
    for piece in ranges:
        cur.execute(
            "SELECT max(last_seq), max(last_received_at) FROM ingest_ranges"
            " WHERE table_name = %s AND run = %s AND first_seq < %s",
            (table, piece.run, piece.first),
        )
        previous_last, previous_received = cur.fetchone()
        if previous_last is not None and piece.first > previous_last + 1:
            logger.error(
                "audit.lost_events table=%s run=%s count=%d seq=%d..%d received_after=%s "
                "(queued by the stream process, never drained: did Redis lose its data?)",
                table,
                piece.run,
                piece.first - previous_last - 1,
                previous_last + 1,
                piece.first - 1,
                previous_received.isoformat() if previous_received else "?",
            )
        cur.execute(
            INSERT_RANGES,
            (table, piece.run, piece.first, piece.last, piece.first_received_us, piece.last_received_us),
        )


def find_losses(cur: Cursor, since: datetime, table: str | None = None) -> list[Loss]:
    """Every hole in the drained ranges received since `since`, oldest first."""
    table_filter = "AND table_name = %(table)s" if table else ""
    cur.execute(HOLES_SQL.format(table_filter=table_filter), {"since": since, "table": table})
    return [Loss(*row) for row in cur.fetchall()]


def drained_counts(cur: Cursor, since: datetime) -> dict[tuple[str, str], tuple[int, int]]:
    """(table, run) -> (envelopes drained, highest number drained) since `since`."""
    cur.execute(
        "SELECT table_name, run, sum(last_seq - first_seq + 1), max(last_seq) FROM ingest_ranges"
        " WHERE last_received_at >= %s GROUP BY table_name, run",
        (since,),
    )
    return {(t, r): (int(n), int(m)) for t, r, n, m in cur.fetchall()}


def format_audit(drained: dict[tuple[str, str], tuple[int, int]], losses: list[Loss]) -> str:
    """The text of `collector audit`: per table and run, what was drained and lost, then each hole. Pure."""
    if not drained:
        return "no audited envelopes drained in this period"
    lost: dict[tuple[str, str], int] = {}
    for loss in losses:
        lost[(loss.table, loss.run)] = lost.get((loss.table, loss.run), 0) + loss.count
    header = ("TABLE", "RUN", "HIGHEST NUMBER", "DRAINED", "LOST")
    rows = [
        (table, run, f"{highest:,}", f"{count:,}", f"{lost.get((table, run), 0):,}")
        for (table, run), (count, highest) in sorted(drained.items())
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines += [
        f"lost: {loss.table} run {loss.run} numbers {loss.first}..{loss.last} ({loss.count} events), "
        f"received between {loss.after_received.isoformat()} and {loss.before_received.isoformat()}"
        for loss in losses
    ]
    lines.append(f"{sum(lost.values())} events lost" if losses else "nothing lost")
    return "\n".join(lines)
