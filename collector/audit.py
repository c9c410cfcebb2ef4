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
from dataclasses import astuple, dataclass
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
    "INSERT INTO ingest_ranges (table_name, run, first_seq, last_seq, first_received_at, last_received_at,"
    " rows_inserted, rows_duplicate, rows_filtered, dead_letters)"
    " VALUES (%s, %s, %s, %s, TIMESTAMPTZ 'epoch' + %s * INTERVAL '1 microsecond',"
    " TIMESTAMPTZ 'epoch' + %s * INTERVAL '1 microsecond', %s, %s, %s, %s)"
)


@dataclass(frozen=True)
class BatchOutcome:
    """What one drain batch made of its envelopes."""

    rows_inserted: int
    rows_duplicate: int
    rows_filtered: int
    dead_letters: int


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


def record_ranges(cur: Cursor, table: str, ranges: list[SeqRange], outcome: BatchOutcome) -> None:
    """Inside the batch's transaction; logs a hole before a range (the loss, as it is found)."""
    for index, piece in enumerate(ranges):
        counts = astuple(outcome) if index == 0 else (0, 0, 0, 0)
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
            (
                table,
                piece.run,
                piece.first,
                piece.last,
                piece.first_received_us,
                piece.last_received_us,
                *counts,
            ),
        )


def find_losses(cur: Cursor, since: datetime, table: str | None = None) -> list[Loss]:
    """Every hole in the drained ranges received since `since`, oldest first."""
    table_filter = "AND table_name = %(table)s" if table else ""
    cur.execute(HOLES_SQL.format(table_filter=table_filter), {"since": since, "table": table})
    return [Loss(*row) for row in cur.fetchall()]


@dataclass(frozen=True)
class RunBalance:
    """One table of one run: what its drains consumed, and what became of it."""

    table: str
    run: str
    highest: int  # the highest number drained
    drained: int  # envelopes drained (a redelivered batch counts twice)
    rows_inserted: int
    rows_duplicate: int
    rows_filtered: int
    dead_letters: int
    started: datetime  # the receive time of its first drained envelope


def drained_balances(cur: Cursor, since: datetime) -> list[RunBalance]:
    """Per (table, run) received since `since`, oldest run first."""
    cur.execute(
        "SELECT table_name, run, max(last_seq), sum(last_seq - first_seq + 1), sum(rows_inserted),"
        " sum(rows_duplicate), sum(rows_filtered), sum(dead_letters), min(first_received_at)"
        " FROM ingest_ranges WHERE last_received_at >= %s GROUP BY table_name, run ORDER BY 9, 1",
        (since,),
    )
    return [
        RunBalance(t, r, int(h), int(d), int(i), int(u), int(f), int(x), s)
        for t, r, h, d, i, u, f, x, s in cur.fetchall()
    ]


def format_audit(
    balances: list[RunBalance], losses: list[Loss], queued: dict[str, int], pending: dict[str, int]
) -> str:
    """The text of `collector audit`. Pure.

    Per table and run: the events the stream process committed to the queue (`queued`, from Redis:
    `<run>/<table>` -> last number), and where they went: drained (into rows stored, duplicate or
    filtered, or dead letters), still queued or in flight (`pending`, per table, the latest run's),
    or lost. A run whose numbers add up says `balanced`.
    """
    if not balances:
        return "no audited events drained in this period"
    latest = {b.table: b.run for b in balances}  # ordered by start: the last one wins
    lost: dict[tuple[str, str], int] = {}
    for loss in losses:
        lost[(loss.table, loss.run)] = lost.get((loss.table, loss.run), 0) + loss.count
    header = (
        "TABLE",
        "RUN",
        "QUEUED",
        "DRAINED",
        "PENDING",
        "LOST",
        "ROWS STORED",
        "DUPLICATE",
        "FILTERED",
        "DEAD LETTERS",
        "BALANCE",
    )
    rows = []
    for b in balances:
        waiting = pending.get(b.table, 0) if latest[b.table] == b.run else 0
        missing = lost.get((b.table, b.run), 0)
        sent = queued.get(f"{b.run}/{b.table}")
        if sent is None:
            verdict, sent_text = "unknown (not in Redis)", "?"
        else:
            short = sent - b.drained - missing - waiting
            verdict = "balanced" if short <= 0 else f"{short:,} not accounted for yet"
            sent_text = f"{sent:,}"
        rows.append(
            (
                b.table,
                b.run,
                sent_text,
                f"{b.drained:,}",
                f"{waiting:,}",
                f"{missing:,}",
                f"{b.rows_inserted:,}",
                f"{b.rows_duplicate:,}",
                f"{b.rows_filtered:,}",
                f"{b.dead_letters:,}",
                verdict,
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines += [
        f"lost: {loss.table} run {loss.run} numbers {loss.first}..{loss.last} ({loss.count} events), "
        f"received between {loss.after_received.isoformat()} and {loss.before_received.isoformat()}"
        for loss in losses
    ]
    lines.append(f"{sum(lost.values())} events lost" if losses else "nothing lost")
    return "\n".join(lines)
