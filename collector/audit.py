"""Every event accounted for: envelope sequence numbers, drained ranges, and the holes between them.

The stream process numbers the envelopes it queues, per table and queue shard, within its run
(`"run":"<id>","seq":<n>` in the envelope head; `collector.streams.sink`; shard k > 0 numbers as the
run `<id>.s<k>`, so each shard, drained at its own pace, is its own first-in-first-out sequence).
Each drain batch records, in the same transaction as its rows, the contiguous ranges of numbers it
consumed (stored, duplicate, filtered or dead-lettered alike) in `ingest_ranges`. Queues are first
in, first out, so once later numbers of a run are drained, a number never drained was lost between
the stream process and PostgreSQL: Redis lost it (a restart without persistence, a FLUSHALL, an
eviction). The loss is reported with its exact count and the receive times around it.

Envelopes of the REST tasks and the gap ledger carry no number and are not audited here.

Retention drops a table's old rows (TimescaleDB's policy) and, with them, their ranges
(`collector.db.timescale.PRUNE_BODY`): a period reaching back past a table's retention is reported as
such (`Horizon`), since what happened to its envelopes there can no longer be told.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass
from datetime import datetime, timedelta
from typing import Final

from psycopg2.extensions import cursor as Cursor

from collector.db.timescale import PRUNE_SCHEDULE, human, read_retention
from collector.queue.keys import shard_of_run

logger = logging.getLogger(__name__)

# The head `make_envelope` writes: market, receive time, then the audit tag.
_RUN_ID: Final = re.compile(r"[\w.-]+", re.ASCII)  # what envelope.AUDIT_TAG reads as a run


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


@functools.lru_cache(maxsize=64)
def _is_run_id(run: str) -> bool:
    return _RUN_ID.fullmatch(run) is not None


def tag_from(envelope: dict[str, object], received_at_us: int) -> tuple[str, int, int] | None:
    """`tag_of` for an envelope already parsed (the drain parses each one anyway): no second look. Pure."""
    run = envelope.get("run")
    seq = envelope.get("seq")
    if type(run) is not str or type(seq) is not int or seq < 0 or not _is_run_id(run):
        return None
    return run, seq, received_at_us


@functools.lru_cache(maxsize=64)
def same_run(run: str) -> re.Pattern[bytes]:
    """The head of an envelope numbered in `run`: its `match(raw, 0, HEAD_BYTES)` says what
    `tag_of(raw)[0] == run` says, in a quarter of the time (no groups to take apart). Pure."""
    return re.compile(
        rb'\{"market":"\w+","received_at_us":\d+,"run":"' + re.escape(run.encode()) + rb'","seq":\d+,'
    )


def contiguous_ranges(tags: Iterable[tuple[str, int, int]]) -> list[SeqRange]:
    """The tags of one batch as contiguous ranges per run (a batch is normally one range). Pure.

    Each range's received times are those of its lowest and highest number. Tags come in queue
    order, which is numbering order: consecutive ones are gathered first, in one pass, so only a
    handful of pieces (usually one) is sorted and merged.
    """
    pieces: list[SeqRange] = []
    current: str | None = None  # the run of the piece being gathered, in plain locals (the hot loop)
    first = last = first_received = last_received = 0
    for run, seq, received in tags:
        if run == current and seq == last + 1:
            last, last_received = seq, received
            continue
        if current is not None:
            pieces.append(SeqRange(current, first, last, first_received, last_received))
        current, first, last, first_received, last_received = run, seq, seq, received, received
    if current is not None:
        pieces.append(SeqRange(current, first, last, first_received, last_received))
    ranges: list[SeqRange] = []
    for piece in sorted(pieces, key=lambda p: (p.run, p.first, p.first_received_us)):
        previous = ranges[-1] if ranges else None
        if previous is None or previous.run != piece.run or piece.first > previous.last + 1:
            ranges.append(piece)
        elif piece.last > previous.last or (
            piece.last == previous.last and piece.last_received_us > previous.last_received_us
        ):
            ranges[-1] = SeqRange(
                piece.run, previous.first, piece.last, previous.first_received_us, piece.last_received_us
            )
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


# The range of the run drained just below a new one (one backward index probe of
# `ingest_ranges_by_run`, however long the run), and whether a range already starts inside it.
NEIGHBOURS_SQL: Final = """
SELECT below.last_seq, below.last_received_at,
       EXISTS (SELECT 1 FROM ingest_ranges
               WHERE table_name = %(table)s AND run = %(run)s AND first_seq BETWEEN %(first)s AND %(last)s)
FROM (SELECT 1) AS one LEFT JOIN LATERAL (
    SELECT last_seq, last_received_at FROM ingest_ranges
    WHERE table_name = %(table)s AND run = %(run)s AND first_seq < %(first)s
    ORDER BY first_seq DESC LIMIT 1) AS below ON true
"""
# Every range below: only when the nearest one leaves a hole, which an earlier, longer range (a
# re-delivered batch) may still cover.
BELOW_SQL: Final = (
    "SELECT max(last_seq), max(last_received_at) FROM ingest_ranges"
    " WHERE table_name = %(table)s AND run = %(run)s AND first_seq < %(first)s"
)


def check_ranges(cur: Cursor, table: str, ranges: list[SeqRange]) -> bool:
    """Before a batch is written: logs a hole before a range (the loss, as it is found), and says
    whether the batch's numbers were drained before (a re-delivered batch, whose rows may be stored)."""
    drained_before = False
    for piece in ranges:
        params = {"table": table, "run": piece.run, "first": piece.first, "last": piece.last}
        cur.execute(NEIGHBOURS_SQL, params)
        previous_last, previous_received, starts_inside = cur.fetchone()
        if previous_last is not None and piece.first > previous_last + 1:
            cur.execute(BELOW_SQL, params)
            previous_last, previous_received = cur.fetchone()
        if starts_inside or (previous_last is not None and previous_last >= piece.first):
            drained_before = True
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
    return drained_before


def insert_ranges(cur: Cursor, table: str, ranges: list[SeqRange], outcome: BatchOutcome) -> None:
    """Inside the batch's transaction: its ranges, with what it made of them on the first."""
    for index, piece in enumerate(ranges):
        counts = astuple(outcome) if index == 0 else (0, 0, 0, 0)
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
class Horizon:
    """Before `start`, retention has dropped rows of audited tables and their ranges."""

    now: datetime
    since: datetime  # the start of the period asked, before `start`
    retention: dict[str, timedelta]  # the retention of each audited table that has one

    @property
    def start(self) -> datetime:
        """The shortest retention sets it: before it, some table's rows and ranges may be gone."""
        return self.now - min(self.retention.values())

    def pruned(self, table: str, received: datetime) -> bool:
        """Whether ranges of `table` received just before `received` may have been pruned: it is at
        that table's horizon, which the prune job reaches every PRUNE_SCHEDULE."""
        kept = self.retention.get(table)
        return kept is not None and received < self.now - kept + 2 * PRUNE_SCHEDULE


def horizon(
    retention: Mapping[str, timedelta], tables: Iterable[str], since: datetime, now: datetime
) -> Horizon | None:
    """The horizon when the period from `since` reaches back past an audited table's retention. Pure."""
    kept = {table: retention[table] for table in sorted(set(tables)) if table in retention}
    if not kept:
        return None
    found = Horizon(now, since, kept)
    return found if since < found.start else None


def format_horizon(found: Horizon) -> str:
    """One line: from when the audit can vouch for its numbers, and why. Pure."""
    by_retention: dict[timedelta, list[str]] = {}
    for table, kept in found.retention.items():
        by_retention.setdefault(kept, []).append(table)
    if len(by_retention) == 1:
        older = human(next(iter(by_retention)))
    else:
        older = ", ".join(f"{human(k)} ({', '.join(t)})" for k, t in sorted(by_retention.items()))
    return (
        f"retention: rows older than {older} are dropped with their ranges, so nothing received before "
        f"{found.start.isoformat(timespec='seconds')} can be accounted for "
        f"(asked from {found.since.isoformat(timespec='seconds')})"
    )


# The tables `ingest_ranges` describes, one index probe each (`ingest_ranges_by_run` leads with
# table_name) rather than a scan of every range.
AUDITED_TABLES_SQL: Final = """
WITH RECURSIVE t(name) AS (
    SELECT min(table_name) FROM ingest_ranges
    UNION ALL
    SELECT (SELECT min(table_name) FROM ingest_ranges WHERE table_name > t.name)
    FROM t WHERE t.name IS NOT NULL
)
SELECT name FROM t WHERE name IS NOT NULL
"""


def read_horizon(cur: Cursor, since: datetime, now: datetime) -> Horizon | None:
    """The audit's horizon from the catalog's retention policies (none on plain PostgreSQL)."""
    retention = read_retention(cur)
    if not retention:
        return None
    cur.execute(AUDITED_TABLES_SQL)
    return horizon(retention, (name for (name,) in cur.fetchall()), since, now)


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
    lowest: int = 1  # the lowest number drained in the period
    earlier: bool = False  # ranges of the run drained before the period are kept


# Per (table, run) in the period; `earlier`: one index probe for a range of the run below the period.
BALANCES_SQL: Final = """
SELECT g.*, EXISTS (SELECT 1 FROM ingest_ranges e
                    WHERE e.table_name = g.table_name AND e.run = g.run AND e.first_seq < g.lowest)
FROM (SELECT table_name, run, max(last_seq), sum(last_seq - first_seq + 1), sum(rows_inserted),
             sum(rows_duplicate), sum(rows_filtered), sum(dead_letters), min(first_received_at),
             min(first_seq) AS lowest
      FROM ingest_ranges WHERE last_received_at >= %s GROUP BY table_name, run) AS g
ORDER BY 9, 1
"""


def drained_balances(cur: Cursor, since: datetime) -> list[RunBalance]:
    """Per (table, run) received since `since`, oldest run first."""
    cur.execute(BALANCES_SQL, (since,))
    return [
        RunBalance(t, r, int(h), int(d), int(i), int(u), int(f), int(x), s, int(low), bool(e))
        for t, r, h, d, i, u, f, x, s, low, e in cur.fetchall()
    ]


def verdict(b: RunBalance, sent: int, missing: int, waiting: int, found: Horizon | None) -> str:
    """`balanced`, or how many queued numbers are not accounted for. Pure.

    A run that began before the period is counted from its lowest number in it: the numbers below
    were drained earlier (its earlier ranges are kept), or retention pruned them with their rows (its
    first kept range is at its table's horizon). Otherwise numbers
    below the lowest were queued and never drained: lost before the run's first drain.
    """
    pruned = found is not None and found.pruned(b.table, b.started)
    counted_from = b.lowest if b.earlier or pruned else 1
    short = sent - (counted_from - 1) - b.drained - missing - waiting
    if short > 0:
        return f"{short:,} not accounted for yet"
    return "balanced" if counted_from == 1 else f"balanced from {counted_from:,}"


def format_audit(
    balances: list[RunBalance],
    losses: list[Loss],
    queued: dict[str, int],
    pending: dict[str, int],
    found: Horizon | None = None,
    spilled: Mapping[str, int] | None = None,
) -> str:
    """The text of `collector audit`. Pure.

    Per table and run: the events the stream process committed to the queue (`queued`, from Redis:
    `<run>/<table>` -> last number), and where they went: drained (into rows stored, duplicate or
    filtered, or dead letters), still queued or in flight (`pending`, per queue shard as
    `keys.shard_name` names it, the latest run's there), or lost. Envelopes the stream process spilled
    to disk (`spilled`, `<run>/<table>` -> count) are queued and pending too, whichever run they
    belong to. A run whose numbers add up says
    `balanced`. First, when the period reaches back past retention (`found`), one line saying from
    when the audit can vouch for its numbers.
    """
    first = [format_horizon(found)] if found else []
    if not balances:
        return "\n".join([*first, "no audited events drained in this period"])
    # Ordered by start: the last run of each queue shard wins.
    latest = {shard_of_run(b.table, b.run): b.run for b in balances}
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
        shard = shard_of_run(b.table, b.run)
        waiting = pending.get(shard, 0) if latest[shard] == b.run else 0
        waiting += (spilled or {}).get(f"{b.run}/{b.table}", 0)
        missing = lost.get((b.table, b.run), 0)
        sent = queued.get(f"{b.run}/{b.table}")
        if sent is None:
            balance, sent_text = "unknown (not in Redis)", "?"
        else:
            balance, sent_text = verdict(b, sent, missing, waiting, found), f"{sent:,}"
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
                balance,
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = first + [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    ]
    lines += [
        f"lost: {loss.table} run {loss.run} numbers {loss.first}..{loss.last} ({loss.count} events), "
        f"received between {loss.after_received.isoformat()} and {loss.before_received.isoformat()}"
        for loss in losses
    ]
    lines.append(f"{sum(lost.values())} events lost" if losses else "nothing lost")
    return "\n".join(lines)
