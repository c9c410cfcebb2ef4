"""The spill segment format: what `collector.streams.spill` writes to disk. Pure: bytes in, bytes out.

A segment is one append-only file written by one run of the stream process:

    header  b"CSPILL1 " + JSON {"run": <run id>, "created_us": <µs>} + b"\\n"
    record  MAGIC (2) | body length (u32 LE) | zlib.crc32 of the body (u32 LE) | body
    body    key length (u16 LE) | key | table length (u8) | table | envelope

`key` is the Redis list the envelope was meant for (whatever `collector.queue.keys.queue` returned),
`table` its table, `envelope` the bytes exactly as they would have been pushed. Records follow each
other with no padding, in the order they were spilled.

Reading never raises on damage. A record whose magic, length or checksum is wrong is skipped up to
the next place a valid record starts (reported as `skipped`, with its offset and size); bytes at the
end of a file that form no complete record (a write cut short by a crash or a full disk) are reported
as `torn`, never as records.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import orjson

SEGMENT_MAGIC: Final = b"CSPILL1 "
RECORD_MAGIC: Final = b"\xc5\x5e"
_HEAD: Final = struct.Struct("<2sII")  # magic, body length, crc32 of the body
_KEY: Final = struct.Struct("<H")
RECORD_HEAD_BYTES: Final = _HEAD.size
# No envelope comes near this (a 5000-level depth snapshot is ~300 kB): a larger length is damage.
MAX_BODY_BYTES: Final = 64 * 1024 * 1024
MAX_HEADER_BYTES: Final = 4096


@dataclass(frozen=True)
class SegmentHeader:
    """Who wrote a segment: the run whose numbered envelopes it holds, and when it was opened."""

    run: str
    created_us: int


@dataclass(frozen=True)
class Record:
    """One spilled envelope and where it sits in its segment."""

    key: str
    table: str
    envelope: bytes
    offset: int  # of its first byte (the magic) in the segment
    size: int  # of the whole record, header included


@dataclass
class Parsed:
    """What one read of a segment's bytes yielded."""

    records: list[Record] = field(default_factory=list)
    end: int = 0  # offset up to which the bytes were consumed (records and skipped damage)
    skipped: list[tuple[int, int]] = field(default_factory=list)  # (offset, bytes) of damage passed over
    torn: int = 0  # bytes at the end of a final read that form no record (a cut-off write)


def encode_header(header: SegmentHeader) -> bytes:
    """The first line of a segment."""
    return SEGMENT_MAGIC + orjson.dumps({"run": header.run, "created_us": header.created_us}) + b"\n"


def decode_header(data: bytes) -> tuple[SegmentHeader, int] | None:
    """The header at the start of `data` and its length; None when it is missing or damaged."""
    if not data.startswith(SEGMENT_MAGIC):
        return None
    newline = data.find(b"\n", 0, MAX_HEADER_BYTES)
    if newline < 0:
        return None
    try:
        fields = orjson.loads(data[len(SEGMENT_MAGIC) : newline])
        return SegmentHeader(str(fields["run"]), int(fields["created_us"])), newline + 1
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def encode_records(key: str, table: str, envelopes: Iterable[bytes]) -> bytes:
    """The records of `envelopes`, all meant for the list `key` of `table`, as one block to append."""
    prefix = _KEY.pack(len(key.encode())) + key.encode() + bytes((len(table.encode()),)) + table.encode()
    parts: list[bytes] = []
    for envelope in envelopes:
        body = prefix + envelope
        parts.append(_HEAD.pack(RECORD_MAGIC, len(body), zlib.crc32(body)))
        parts.append(body)
    return b"".join(parts)


def _record_at(data: bytes | memoryview, pos: int, base: int) -> Record | int | None:
    """The valid record at `pos`; None when the bytes there are no valid record; or, when they may
    begin one that `data` ends too soon to hold, the number of bytes it would need."""
    if len(data) - pos < RECORD_HEAD_BYTES:
        return RECORD_HEAD_BYTES
    magic, length, crc = _HEAD.unpack_from(data, pos)
    if magic != RECORD_MAGIC or length > MAX_BODY_BYTES or length < _KEY.size + 1:
        return None
    start, stop = pos + RECORD_HEAD_BYTES, pos + RECORD_HEAD_BYTES + length
    if stop > len(data):
        return RECORD_HEAD_BYTES + int(length)
    body = bytes(data[start:stop])
    if zlib.crc32(body) != crc:
        return None
    (key_length,) = _KEY.unpack_from(body, 0)
    table_at = _KEY.size + key_length
    if table_at >= len(body):
        return None
    table_stop = table_at + 1 + body[table_at]
    if table_stop > len(body):
        return None
    try:
        key = body[_KEY.size : table_at].decode()
        table = body[table_at + 1 : table_stop].decode()
    except UnicodeDecodeError:
        return None
    return Record(key, table, body[table_stop:], base + pos, RECORD_HEAD_BYTES + length)


def parse_records(data: bytes | memoryview, base: int = 0, final: bool = True, limit: int = 0) -> Parsed:
    """The records in `data`, which starts at offset `base` of its segment, at a record boundary.

    `final`: `data` runs to the end of the segment, so bytes that form no record there are torn;
    otherwise parsing stops before a record that `data` cuts off (read on from `end`).
    `limit`: stop after this many records (0: no limit).
    """
    parsed = Parsed(end=base)
    pos = 0
    while pos < len(data) and not (limit and len(parsed.records) >= limit):
        found = _record_at(data, pos, base)
        if isinstance(found, Record):
            parsed.records.append(found)
            pos += found.size
            continue
        if isinstance(found, int) and not final:
            break  # may be a record the next read completes
        resume = _next_valid(data, pos + 1, base)
        if resume is None:
            if not final:
                break
            parsed.torn = len(data) - pos
            pos = len(data)
            break
        parsed.skipped.append((base + pos, resume - pos))
        pos = resume
    parsed.end = base + pos
    return parsed


def _next_valid(data: bytes | memoryview, start: int, base: int) -> int | None:
    """Where the next valid, complete record in `data` begins at or after `start`; None if nowhere."""
    raw = bytes(data) if isinstance(data, memoryview) else data
    at = raw.find(RECORD_MAGIC, start)
    while at >= 0:
        if isinstance(_record_at(raw, at, base), Record):
            return at
        at = raw.find(RECORD_MAGIC, at + 1)
    return None


def group_by_key(records: Sequence[Record]) -> dict[str, list[bytes]]:
    """The envelopes of `records` per Redis list, each list's in record order. Pure."""
    grouped: dict[str, list[bytes]] = {}
    for record in records:
        grouped.setdefault(record.key, []).append(record.envelope)
    return grouped
