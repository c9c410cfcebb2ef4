"""Drain one table's Redis queue into PostgreSQL: claim a batch, COPY it, commit, then acknowledge.

Guarantees:
- Nothing is lost: a batch leaves Redis only after PostgreSQL committed its rows. If PostgreSQL is
  down, or the worker dies mid-batch, the batch stays in flight and the next drain recovers it.
- Nothing is stored twice: every table has a natural unique key. A batch is COPYed straight into
  its table; one that may repeat stored rows (re-delivered, as its audit ranges show, or found to
  collide) goes through a staging table and `ON CONFLICT DO NOTHING`, inserting only what is new.
- One drain per queue shard at a time, through a Redis lock (`collector:lock:drain:<shard>`) whose
  expiry frees the shard when its holder died; shards of one table drain in parallel, each in order.
- An envelope that cannot be stored (bad JSON, missing field, a value PostgreSQL rejects) goes to
  the dead-letter list with its reason and never blocks the queue.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg2
import psycopg2.errors
import redis
from psycopg2.extensions import connection as Connection

from collector.audit import (
    BatchOutcome,
    SeqRange,
    check_ranges,
    contiguous_ranges,
    insert_ranges,
    same_run,
    tag_from,
)
from collector.db.copy import LINE_WRITERS, CopyResult, copy_direct, copy_staged
from collector.db.schema import UPSERT_COLUMNS
from collector.errors import FrameError
from collector.queue import keys
from collector.queue.batches import Batch, BatchQueue, queue_length
from collector.queue.deadletter import DeadLetter
from collector.queue.drain_summary import DrainSummaries
from collector.queue.envelope import HEAD_BYTES, extractor, open_envelope, split_envelope, tag_of
from collector.queue.locks import RedisLock, drain_lock
from collector.queue.shards import present_lanes
from collector.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class BatchRows:
    """What one claimed batch turns into: rows to write, dead letters, and filtered COIN-M rows."""

    lines: list[str] = field(default_factory=list)  # one row each, in COPY text format
    owners: list[int] = field(default_factory=list)  # index of the envelope each line came from
    dead_letters: list[DeadLetter] = field(default_factory=list)
    coin_m_skipped: int = 0
    rendered: bytes = b""  # the lines, joined and encoded: the COPY buffer
    tags: list[tuple[str, int, int]] = field(default_factory=list)  # audited envelopes (run, seq, received)

    @property
    def count(self) -> int:
        """Rows to write."""
        return len(self.lines)


@dataclass
class DrainResult:
    table: str
    batches: int = 0
    envelopes: int = 0
    inserted: int = 0
    duplicates: int = 0
    filtered: int = 0  # rows left out before the insert (COIN-M): `collector audit`'s FILTERED
    dead_letters: int = 0
    lock_busy: bool = False
    remaining: int = 0
    recovered: int = 0  # batches left in flight by a drain that died, written by this one


def dead_letter(reason: str, table: str, raw: bytes) -> DeadLetter:
    """The dead letter of an envelope: its frame and head, or the whole envelope if the head is unreadable."""
    parts = split_envelope(raw)
    if parts is None:
        return DeadLetter(reason, "drain", None, table, None, raw)
    return DeadLetter(
        reason,
        "drain",
        parts.market,
        table,
        parts.received_at_us,
        parts.frame,
        symbol=parts.symbol,
        run=parts.run,
        seq=parts.seq,
    )


def build_rows(table: str, batch: list[bytes], keep_coin_m: bool) -> BatchRows:
    """Parse and render a batch; pure. Envelopes that cannot be stored become dead letters.

    Each envelope is parsed once: its audit tag, rows and COPY lines all come from that one parse.
    """
    out = BatchRows()
    extract = extractor(table)
    write = LINE_WRITERS[table]
    lines, owners, tags = out.lines, out.owners, out.tags
    for index, raw in enumerate(batch):
        try:
            envelope, received_at = open_envelope(raw)
        except FrameError as error:
            tag = tag_of(raw)  # counted as drained whatever becomes of it: row, duplicate or dead letter
            if tag is not None:
                tags.append(tag)
            out.dead_letters.append(dead_letter(str(error), table, raw))
            continue
        tag = tag_from(envelope, received_at)
        if tag is not None:
            tags.append(tag)
        try:
            rows, skipped = extract(envelope, received_at, keep_coin_m)
            rendered = [write(row) for row in rows]
        except FrameError as error:
            out.dead_letters.append(dead_letter(str(error), table, raw))
            continue
        lines += rendered
        owners += [index] * len(rendered)
        out.coin_m_skipped += skipped
    out.rendered = "".join(lines).encode()
    return out


def split_by_run(items: list[bytes]) -> list[list[bytes]]:
    """A batch as one part per stream-process run, in the order the runs first appear. Pure.

    `collector audit` books each batch's rows (stored, duplicate, filtered) to its run; a batch that
    spans two runs (a restart inside one batch, or several stream processes sharing a queue) is
    written as one part per run so each run gets exactly its own rows. Each run's envelopes keep
    their order; envelopes of different runs are different events (or repeats that the natural
    keys absorb whichever part comes first).
    """
    parts: dict[str | None, list[bytes]] = {}
    part: list[bytes] = []
    head: re.Pattern[bytes] | None = None  # the head of an envelope of the last run seen
    for raw in items:
        if head is None or head.match(raw, 0, HEAD_BYTES) is None:
            tag = tag_of(raw)
            run = None if tag is None else tag[0]
            part = parts.setdefault(run, [])
            head = None if run is None else same_run(run)
        part.append(raw)
    return list(parts.values())


def write_batch(conn: Connection, table: str, batch: list[bytes], parsed: BatchRows) -> CopyResult:
    """Write the batch and its audit ranges in one transaction; if PostgreSQL rejects a value, isolate
    the culprits.

    The rows are COPYed straight into the table unless the batch may collide: the gap ledger (whose
    records merge), a batch whose numbers were drained before (re-delivered after a drain died between
    its commit and its acknowledgement), or one that turns out to (`UniqueViolation`: the same event
    received twice); those go through the staging table and `ON CONFLICT`.
    A `DataError` (say a `\\u0000` in a payload, which JSONB refuses) would otherwise fail the whole
    batch forever. Then each envelope is written on its own and the rejected ones become dead letters.
    """
    ranges = contiguous_ranges(parsed.tags)
    try:
        with conn.cursor() as cur:
            drained_before = check_ranges(cur, table, ranges)
        result = _copy(conn, table, parsed, may_collide=drained_before or table in UPSERT_COLUMNS)
        _record_ranges(conn, table, parsed, ranges, result)
        conn.commit()
        return result
    except psycopg2.DataError as error:
        conn.rollback()
        logger.warning(
            "drain.batch_rejected table=%s error=%s action=isolate", table, str(error).splitlines()[0]
        )
    staged = inserted = 0
    by_owner: dict[int, list[str]] = {}
    for owner, line in zip(parsed.owners, parsed.lines, strict=True):
        by_owner.setdefault(owner, []).append(line)
    for owner, lines in by_owner.items():
        try:
            result = copy_staged(conn, table, "".join(lines).encode(), len(lines))
            conn.commit()
        except psycopg2.DataError as error:
            conn.rollback()
            reason = f"rejected by PostgreSQL: {str(error).splitlines()[0]}"
            parsed.dead_letters.append(dead_letter(reason, table, batch[owner]))
            continue
        staged += result.staged
        inserted += result.inserted
    result = CopyResult(staged, inserted)
    _record_ranges(conn, table, parsed, ranges, result)
    conn.commit()
    return result


def _copy(conn: Connection, table: str, parsed: BatchRows, may_collide: bool) -> CopyResult:
    """The batch's rows, straight into the table when they should all be new, else (or when they turn
    out not to be) through the staging table. Leaves the transaction open."""
    if may_collide:
        return copy_staged(conn, table, parsed.rendered, parsed.count)
    try:
        return copy_direct(conn, table, parsed.rendered, parsed.count)
    except psycopg2.errors.UniqueViolation:
        conn.rollback()  # nothing written yet in this transaction but the COPY that failed
        logger.info("drain.batch_collides table=%s rows=%d action=stage", table, parsed.count)
        return copy_staged(conn, table, parsed.rendered, parsed.count)


def _record_ranges(
    conn: Connection, table: str, parsed: BatchRows, ranges: list[SeqRange], result: CopyResult
) -> None:
    if ranges:
        outcome = BatchOutcome(
            result.inserted, result.duplicates, parsed.coin_m_skipped, len(parsed.dead_letters)
        )
        with conn.cursor() as cur:
            insert_ranges(cur, table, ranges, outcome)


# Drains write many batches a second per table: their summary goes out at INFO once a minute per
# table, with the totals of every worker process's drains (summed in Redis), or at once when
# something notable happened (dead letters, recovered batches).
SUMMARY_INTERVAL_S = 60.0


def log_summary(summaries: DrainSummaries, result: DrainResult, now_us: int, notable: bool) -> None:
    """Add one run to its table's shared summary; log the totals at INFO when due or notable.

    The other runs log only their own numbers, at DEBUG.
    """
    run = {
        "runs": 1,
        "envelopes": result.envelopes,
        "inserted": result.inserted,
        "duplicates": result.duplicates,
        "filtered": result.filtered,
        "dead_letters": result.dead_letters,
    }
    totals = summaries.add_run(result.table, run, now_us, SUMMARY_INTERVAL_S, take_now=notable)
    if totals is None:
        logger.debug(
            "drain.run table=%s envelopes=%d inserted=%d duplicates=%d filtered=%d dead_letters=%d "
            "remaining=%d",
            result.table,
            result.envelopes,
            result.inserted,
            result.duplicates,
            result.filtered,
            result.dead_letters,
            result.remaining,
        )
        return
    logger.info(
        "drain.summary table=%s over_s=%.0f runs=%d envelopes=%d inserted=%d duplicates=%d "
        "filtered=%d dead_letters=%d remaining=%d (all worker processes)",
        result.table,
        totals.over_s,
        totals.runs,
        totals.envelopes,
        totals.inserted,
        totals.duplicates,
        totals.filtered,
        totals.dead_letters,
        result.remaining,
    )


class Drainer:
    """Moves one table's queue shards into PostgreSQL in batches until they are empty or the time is up.

    Two batches are in flight at most: while a writer thread COPYs and commits batch k, this thread
    claims and parses batch k+1, so Python and PostgreSQL work side by side. Batches are still
    written and acknowledged in claim order. This is the one-shot drain of `collector trigger drain`;
    the continuous drain loops (collector.drain_loop) use the same steps.
    """

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        connect: Callable[[], Connection],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._redis = client
        self._connect = connect
        self._clock = clock
        self._summaries = DrainSummaries(client)

    def drain(self, table: str) -> DrainResult:
        """Drain every shard of `table` once. Idempotence key: the natural key of each row; a duplicate
        run finds the shards locked (and returns) or nothing new."""
        if table not in keys.TABLES:
            raise ValueError(f"unknown table {table!r} (one of {', '.join(keys.TABLES)})")
        result = DrainResult(table)
        shards = [shard for _, shard in present_lanes(self._redis, (table,), self._settings.queue_shards)]
        deadline = self._clock() + self._settings.drain_run_max_s
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"drain-{table}") as writer:
            for shard in shards:
                if self._clock() >= deadline:
                    break
                lock = drain_lock(self._redis, table, self._settings.drain_lock_ttl_s, shard)
                if not lock.acquire():
                    # A drain loop is on it: not news (a loop holds a shard for each of its batches).
                    logger.debug("drain.lock_busy table=%s shard=%d", table, shard)
                    result.lock_busy = True
                    continue
                try:
                    self._drain_locked(BatchQueue(self._redis, table, shard), lock, result, writer, deadline)
                finally:
                    if not lock.release():
                        logger.warning(
                            "drain.lock_lost table=%s shard=%d (expired during the run; the next drain "
                            "recovers)",
                            table,
                            shard,
                        )
        result.remaining = queue_length(self._redis, table, shards)
        if result.batches:
            notable = bool(result.dead_letters or result.recovered)
            log_summary(self._summaries, result, time.time_ns() // 1000, notable)
        return result

    def _drain_locked(
        self,
        queue: BatchQueue,
        lock: RedisLock,
        result: DrainResult,
        writer: ThreadPoolExecutor,
        deadline: float,
    ) -> None:
        conn = self._connect()  # before claiming: with PostgreSQL down, nothing moves
        recovered = self.recover(queue)
        result.recovered += len(recovered)
        pending: Future[None] | None = None
        try:
            while self._clock() < deadline:
                batch = recovered.pop(0) if recovered else queue.claim(self._settings.drain_batch_max_rows)
                if batch is None:
                    break
                parsed = self.parse(queue.table, batch)
                if pending is not None:
                    pending.result()  # the previous batch is committed and acknowledged (or raises)
                # Still ours? If the lock expired, another drain may be recovering: stop claiming.
                # The batch just claimed stays in flight for the next drain to recover.
                if not lock.extend():
                    break
                pending = self.submit(writer, conn, queue, batch, parsed, result)
        finally:
            if pending is not None:
                pending.result()

    @staticmethod
    def recover(queue: BatchQueue) -> list[Batch]:
        """The shard's batches left in flight by a drain that died; call with the shard's lock held."""
        recovered = queue.recover()
        if recovered:
            logger.warning(
                "drain.recovering table=%s shard=%d batches=%d", queue.table, queue.shard, len(recovered)
            )
        return recovered

    def parse(self, table: str, batch: Batch) -> list[tuple[list[bytes], BatchRows]]:
        """A claimed batch as the parts to write (one per stream-process run), rendered."""
        keep_coin_m = self._settings.keep_coin_m_rows
        return [(part, build_rows(table, part, keep_coin_m)) for part in split_by_run(batch.items)]

    def submit(
        self,
        writer: ThreadPoolExecutor,
        conn: Connection,
        queue: BatchQueue,
        batch: Batch,
        parts: list[tuple[list[bytes], BatchRows]],
        result: DrainResult,
    ) -> Future[None]:
        """Write and acknowledge `batch` on the writer thread; the future raises what the write raised."""
        return writer.submit(self._write_and_acknowledge, conn, queue, batch, parts, result)

    @staticmethod
    def _write_and_acknowledge(
        conn: Connection,
        queue: BatchQueue,
        batch: Batch,
        parts: list[tuple[list[bytes], BatchRows]],
        result: DrainResult,
    ) -> None:
        # Each part commits on its own (normally there is one); the batch leaves Redis after the last.
        written = [write_batch(conn, queue.table, items, parsed) for items, parsed in parts]
        dead_letters = [letter for _, parsed in parts for letter in parsed.dead_letters]
        inserted = sum(w.inserted for w in written)
        duplicates = sum(w.duplicates for w in written)
        filtered = sum(parsed.coin_m_skipped for _, parsed in parts)
        queue.acknowledge(
            batch,
            committed_at_us=time.time_ns() // 1000,
            dead_letters=dead_letters,
            inserted=inserted,
            duplicates=duplicates,
            coin_m_skipped=filtered,
        )
        result.batches += 1
        result.envelopes += len(batch.items)
        result.inserted += inserted
        result.duplicates += duplicates
        result.filtered += filtered
        result.dead_letters += len(dead_letters)
        for letter in dead_letters:
            logger.warning(
                "drain.dead_letter table=%s reason=%s run=%s seq=%s frame=%r",
                queue.table,
                letter.reason,
                letter.run,
                letter.seq,
                letter.frame[:200],
            )
