"""The spill's files: one segment's bookkeeping, loading what an earlier run left, small file helpers.

`collector.streams.spill` uses these; the record format itself is `collector.streams.spill_format`'s.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from collector.queue.envelope import tag_of
from collector.streams.shard import Shard, other_split
from collector.streams.spill_format import Parsed, SegmentHeader, decode_header, parse_records

logger = logging.getLogger(__name__)


@dataclass
class Segment:
    """One segment file and what of it is still to be fed back."""

    number: int
    path: Path
    header: SegmentHeader
    size: int  # end of the last complete record
    acked: int  # offset of the first record not yet acknowledged
    sealed: bool
    keys: Counter[str] = field(default_factory=Counter)  # records not yet acknowledged, per Redis list
    tables: Counter[str] = field(default_factory=Counter)  # ... per table
    acked_keys: Counter[str] = field(default_factory=Counter)
    acked_tables: Counter[str] = field(default_factory=Counter)
    last_seq: dict[str, int] = field(default_factory=dict)  # table -> highest audit number spilled

    def sidecar(self, suffix: str) -> Path:
        return self.path.with_suffix(suffix)


def load_segment(path: Path) -> Segment | None:
    """A segment an earlier run left, with what of it is still to be fed back; None if unreadable."""
    with path.open("rb") as file:
        decoded = decode_header(file.read(4096))
    if decoded is None:
        logger.warning(
            "spill.segment_unreadable path=%s bytes=%d (no header; left in place)",
            path,
            path.stat().st_size,
        )
        return None
    header, start = decoded
    acked_keys, acked_tables, acked = Counter[str](), Counter[str](), start
    ack = _read_json(path.with_suffix(".ack"))
    if ack is not None:
        acked = int(ack["offset"])
        acked_keys, acked_tables = Counter(ack["keys"]), Counter(ack["tables"])
    summary = _read_json(path.with_suffix(".sum"))
    if summary is None:
        summary = _scan(path, start)
    segment = Segment(segment_number(path), path, header, int(summary["size"]), acked, sealed=True)
    segment.keys = Counter(summary["keys"]) - acked_keys
    segment.tables = Counter(summary["tables"]) - acked_tables
    segment.acked_keys, segment.acked_tables = acked_keys, acked_tables
    segment.last_seq = {table: int(seq) for table, seq in summary["last_seq"].items()}
    return segment


def _scan(path: Path, start: int) -> dict[str, Any]:
    """Read a segment a crash left unsealed: drop a torn tail, count what it holds, seal it."""
    data = path.read_bytes()
    parsed = parse_records(memoryview(data)[start:], start, final=True)
    report_damage(path, parsed)
    if parsed.torn:
        with path.open("r+b") as file:
            file.truncate(len(data) - parsed.torn)
            os.fsync(file.fileno())
    keys = Counter(record.key for record in parsed.records)
    tables = Counter(record.table for record in parsed.records)
    last_seq: dict[str, int] = {}
    for record in parsed.records:
        tag = tag_of(record.envelope)
        if tag is not None:
            last_seq[record.table] = tag[1]
    summary: dict[str, Any] = {
        "size": len(data) - parsed.torn,
        "keys": keys,
        "tables": tables,
        "last_seq": last_seq,
    }
    write_atomic(path.with_suffix(".sum"), orjson.dumps(summary))
    return summary


def report_damage(path: Path, parsed: Parsed) -> None:
    for offset, size in parsed.skipped:
        logger.warning(
            "spill.damaged_record path=%s offset=%d bytes=%d (checksum or framing wrong; skipped)",
            path,
            offset,
            size,
        )
    if parsed.torn:
        logger.warning(
            "spill.torn_tail path=%s bytes=%d (a write cut off by the last stop; dropped)", path, parsed.torn
        )


def stranded(base: Path, shard: Shard) -> dict[Path, int]:
    """SPILL_DIR `base` and its shard directories that hold segments no process of `shard`'s split
    takes (`collector.streams.shard.other_split`), with how many each holds. Blocking."""
    found: dict[Path, int] = {}
    candidates = [base, *base.glob("shard-*")] if base.is_dir() else []
    for directory in candidates:
        if other_split("" if directory == base else directory.name, shard):
            count = sum(1 for _ in directory.glob("seg-*.spill"))
            if count:
                found[directory] = count
    return found


def segment_number(path: Path) -> int:
    return int(path.stem.removeprefix("seg-"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def write_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    """Replace `path` with `data` (rename over it, so a crash leaves the old file or the new one)."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    with temporary.open("wb") as file:
        file.write(data)
        if sync:
            file.flush()
            os.fsync(file.fileno())
    os.replace(temporary, path)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
