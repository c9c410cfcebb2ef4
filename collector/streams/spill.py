"""The spill: envelopes Redis has no room for, kept on local disk in order until it has.

Guarantees:
- `append()` returns only once its records are written and fsynced (one fsync per call: the sink
  calls it once per flush), so what it accepted survives a SIGKILL or a power cut.
- Records are fed back (`read()`, then `ack()` once Redis holds them) oldest first, so for each
  Redis list the order in which envelopes were spilled is the order they reach it.
- A segment is deleted only when every record in it was acknowledged. Progress is saved next to it
  (`seg-N.ack`) after each acknowledgement; a crash before that save only feeds the last read again
  (duplicates the drains' natural keys absorb), never skips one.
- `open()` resumes whatever a previous run left, a crash included: a cut-off last record is dropped
  with a warning naming its bytes, a damaged one is skipped with a warning, nothing raises.

Files in SPILL_DIR: `seg-<n>.spill` (the records, `collector.streams.spill_format`), `seg-<n>.sum`
(what a sealed segment holds: records per key and table, the last audit number per table), `seg-<n>.ack`
(how far it was fed back), `lock` (held while a process uses the directory). Blocking file work runs
in a worker thread, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

from collector.errors import ConfigError
from collector.queue import keys
from collector.queue.envelope import tag_of
from collector.streams.spill_format import Record, SegmentHeader, encode_header, encode_records, parse_records
from collector.streams.spill_segments import (
    Segment,
    fsync_dir,
    load_segment,
    report_damage,
    segment_number,
    write_atomic,
)

logger = logging.getLogger(__name__)

SEGMENT_BYTES: Final = 64 * 1024 * 1024  # a new segment past this size: fed-back space is freed per file


@dataclass(frozen=True)
class Chunk:
    """Records read for feeding back, with where the read ended."""

    segment: Segment
    records: list[Record]
    end: int


@dataclass(frozen=True)
class Groups:
    """What one flush spills: per Redis list, its table and envelopes (oldest first)."""

    items: list[tuple[str, str, list[bytes]]]

    @property
    def envelopes(self) -> int:
        return sum(len(envelopes) for _, _, envelopes in self.items)


class Spill:
    """The spill directory of one stream process. Use from one asyncio task only."""

    def __init__(self, directory: Path, run: str, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.run = run
        self._segment_bytes = segment_bytes
        self._segments: list[Segment] = []  # oldest first; the last one may be the active one
        self._active: Segment | None = None
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._last_number = 0
        self._writing: asyncio.Future[None] | None = None  # the last append, finished or not
        self.held: Counter[str] = Counter()  # Redis list -> records on disk
        self.pending: Counter[str] = Counter()  # `<run>/<table>` -> records on disk
        self.recovered_seq: dict[str, int] = {}  # `<run>/<table>` -> last number, of earlier runs

    # --- start and stop ----------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory and take over what earlier runs left in it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise ConfigError(
                f"SPILL_DIR: {self.directory} is in use by another stream process; give each its own"
            ) from None
        for path in sorted(self.directory.glob("seg-*.spill"), key=segment_number):
            self._last_number = segment_number(path)
            segment = load_segment(path)
            if segment is not None:
                self._adopt(segment)
        if self._segments:
            logger.warning(
                "spill.resumed dir=%s segments=%d envelopes=%d bytes=%d",
                self.directory,
                len(self._segments),
                self.envelopes,
                self.disk_bytes,
            )

    def close(self) -> None:
        """Seal the active segment (so the next start need not scan it) and release the directory."""
        if self._active is not None and self._fd is not None:
            self._seal(self._active)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- figures -----------------------------------------------------------------------------------

    @property
    def envelopes(self) -> int:
        return sum(self.held.values())

    @property
    def disk_bytes(self) -> int:
        """Bytes on disk not yet fed back."""
        return sum(segment.size - segment.acked for segment in self._segments)

    @property
    def segments(self) -> int:
        return len(self._segments)

    @property
    def oldest_us(self) -> int | None:
        """When the oldest segment still on disk was opened."""
        return self._segments[0].header.created_us if self._segments else None

    def holds(self, key: str) -> bool:
        """Whether envelopes of `key` wait on disk: newer ones must then queue behind them."""
        return self.held.get(key, 0) > 0

    # --- writing -----------------------------------------------------------------------------------

    async def append(self, groups: Groups) -> None:
        """Write `groups` to the active segment and fsync; raises OSError (nothing written then).

        Cancelling the caller is safe: the write and its bookkeeping still finish (a shutdown that
        gives up waiting then keeps those envelopes twice, on disk and in memory: a duplicate, never
        a gap), and the next append waits for it.
        """
        if not groups.items:
            return
        job = asyncio.ensure_future(self._append_after(self._writing, groups))
        self._writing = job
        await asyncio.shield(job)

    async def _append_after(self, previous: asyncio.Future[None] | None, groups: Groups) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # its error, if any, went to its own caller
        # Encoding too runs in the thread: a whole buffer spilled at once is ~1 µs an envelope.
        await asyncio.to_thread(self._write_groups, groups)
        segment = self._active
        assert segment is not None
        for key, table, envelopes in groups.items:
            segment.keys[key] += len(envelopes)
            segment.tables[table] += len(envelopes)
            self.held[key] += len(envelopes)
            self.pending[keys.audit_field(segment.header.run, table)] += len(envelopes)
            tag = tag_of(envelopes[-1])
            if tag is not None:
                segment.last_seq[table] = tag[1]
        if segment.size >= self._segment_bytes:
            await asyncio.to_thread(self._seal, segment)

    def _write_groups(self, groups: Groups) -> None:
        self._write(b"".join(encode_records(key, table, envelopes) for key, table, envelopes in groups.items))

    def _write(self, block: bytes) -> None:
        """Append `block` to the active segment (opening one if needed) and fsync it. Blocking."""
        if self._active is None or self._fd is None:
            self._start_segment()
        assert self._active is not None and self._fd is not None
        segment, start = self._active, self._active.size
        try:
            view = memoryview(block)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, start)  # no half record stays behind a failed write
            raise
        segment.size = start + len(block)

    def _start_segment(self) -> None:
        # Never a name used before by this process, even once deleted: each name means one file in the logs.
        number = max([self._last_number, *(segment.number for segment in self._segments)]) + 1
        self._last_number = number
        header = SegmentHeader(self.run, time.time_ns() // 1000)
        path = self.directory / f"seg-{number:012d}.spill"
        data = encode_header(header)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        fsync_dir(self.directory)  # the new name survives a crash too
        segment = Segment(number, path, header, len(data), len(data), sealed=False)
        self._segments.append(segment)
        self._active, self._fd = segment, fd
        logger.info("spill.segment_opened path=%s", path)

    def _seal(self, segment: Segment) -> None:
        """Close the active segment and record what it holds; appends go to a new one. Blocking."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
        self._fd, self._active = None, None
        segment.sealed = True
        total_keys = segment.keys + segment.acked_keys
        total_tables = segment.tables + segment.acked_tables
        summary = {
            "size": segment.size,
            "keys": total_keys,
            "tables": total_tables,
            "last_seq": segment.last_seq,
        }
        write_atomic(segment.sidecar(".sum"), orjson.dumps(summary))

    # --- feeding back ------------------------------------------------------------------------------

    async def read(self, max_bytes: int, max_records: int) -> Chunk | None:
        """The oldest records not yet fed back, at most about `max_bytes` / `max_records`; None if none."""
        segment = next((s for s in self._segments if s.acked < s.size), None)
        if segment is None:
            return None
        return await asyncio.to_thread(self._read, segment, max_bytes, max_records)

    def _read(self, segment: Segment, max_bytes: int, max_records: int) -> Chunk:
        want = max_bytes
        with segment.path.open("rb") as file:
            while True:
                file.seek(segment.acked)
                data = file.read(min(want, segment.size - segment.acked))
                final = segment.acked + len(data) >= segment.size
                parsed = parse_records(data, segment.acked, final=final, limit=max_records)
                if parsed.records or parsed.end > segment.acked or final:
                    break
                want *= 2  # one record larger than the read, or damage spanning it: read on
        report_damage(segment.path, parsed)
        return Chunk(segment, parsed.records, parsed.end)

    def take(self, chunk: Chunk) -> None:
        """Count `chunk` as no longer on disk (before the MULTI that moves it, whose figures say so)."""
        self._count(chunk, -1)

    def untake(self, chunk: Chunk) -> None:
        """That MULTI failed: `chunk` is still waiting on disk."""
        self._count(chunk, 1)

    def _count(self, chunk: Chunk, sign: int) -> None:
        segment = chunk.segment
        for record in chunk.records:
            segment.keys[record.key] += sign
            segment.tables[record.table] += sign
            segment.acked_keys[record.key] -= sign
            segment.acked_tables[record.table] -= sign
            self.held[record.key] += sign
            self.pending[keys.audit_field(segment.header.run, record.table)] += sign
        _clean(self.held)
        _clean(self.pending)

    def ack(self, chunk: Chunk) -> None:
        """Redis holds `chunk` (already `take`n): save the progress; delete the segment once all is fed."""
        segment = chunk.segment
        segment.acked = chunk.end
        if segment.acked < segment.size:
            state = {"offset": segment.acked, "keys": segment.acked_keys, "tables": segment.acked_tables}
            write_atomic(segment.sidecar(".ack"), orjson.dumps(state), sync=False)
            return
        if segment is self._active:
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._active = None, None
        self._drop(segment)

    def _drop(self, segment: Segment) -> None:
        """Delete a fully fed segment; what its damaged records held is no longer waiting."""
        for key, left in segment.keys.items():
            self.held[key] -= left
        for table, left in segment.tables.items():
            self.pending[keys.audit_field(segment.header.run, table)] -= left
        _clean(self.held)
        _clean(self.pending)
        if any(count > 0 for count in segment.keys.values()):
            logger.error(
                "spill.records_unreadable path=%s envelopes=%d (damaged on disk: see `collector audit`)",
                segment.path,
                sum(segment.keys.values()),
            )
        sidecars = [segment.sidecar(suffix) for suffix in (".sum", ".ack", ".sum.tmp", ".ack.tmp")]
        for path in (segment.path, *sidecars):
            path.unlink(missing_ok=True)
        self._segments.remove(segment)
        logger.info("spill.segment_fed path=%s", segment.path)

    # --- loading what an earlier run left -----------------------------------------------------------

    def _adopt(self, segment: Segment) -> None:
        self._segments.append(segment)
        for key, count in segment.keys.items():
            self.held[key] += count
        for table, count in segment.tables.items():
            self.pending[keys.audit_field(segment.header.run, table)] += count
        if segment.header.run != self.run:
            for table, seq in segment.last_seq.items():
                name = keys.audit_field(segment.header.run, table)
                self.recovered_seq[name] = max(seq, self.recovered_seq.get(name, 0))
        _clean(self.held)
        _clean(self.pending)


def _clean(counter: Counter[str]) -> None:
    for name in [name for name, count in counter.items() if count <= 0]:
        del counter[name]
