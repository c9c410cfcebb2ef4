"""The envelope: the project's own record, one per item in every Redis queue. Pure.

`make_envelope` wraps a WebSocket frame, a REST body or a gap record, byte for byte, with its market
and receive time (and the stream process's audit tag, and the symbol a REST body was asked for):
`{"market":"futures","received_at_us":1764000000000000,"run":"…","seq":7,"symbol":"BTCUSDT","frame":…}`.
The stream sink, the gap ledger, the REST pollers and the gap records write it; the drain reads it
(`parse_envelope`, into the rows of its table) and the dead-letter and audit code split it again
(`split_envelope`). What a frame means is Binance's (`collector.binance.rows`) or the gap ledger's
(`collector.gaps.rows`); this module knows only the wrapping.
"""

from __future__ import annotations

import re
from typing import Any, Final, NamedTuple

import orjson

from collector.binance import rows as binance_rows
from collector.binance.rows import Extractor, ParsedEnvelope
from collector.errors import FrameError
from collector.gaps import rows as gap_rows

# Every drained table's row type: its fields are the table's COPY columns, in order.
ROW_TYPES: dict[str, type[tuple[Any, ...]]] = {**binance_rows.ROW_TYPES, **gap_rows.ROW_TYPES}
_EXTRACTORS: dict[str, Extractor] = {**binance_rows.EXTRACTORS, **gap_rows.EXTRACTORS}


def make_envelope(
    market: str, received_at_us: int, frame: bytes, symbol: str | None = None, audit: bytes = b""
) -> bytes:
    """Wrap a raw frame or REST body, unmodified, with its market and receive time.

    `frame` must already be valid JSON: it is embedded byte for byte, never re-serialised. `audit`
    is the stream process's `,"run":"<id>","seq":<n>` (collector.audit), right after the time.
    """
    head = b'{"market":"' + market.encode() + b'","received_at_us":' + str(received_at_us).encode() + audit
    if symbol is not None:
        head += b',"symbol":"' + symbol.encode() + b'"'
    return head + b',"frame":' + frame + b"}"


# The head `make_envelope` writes, up to the frame: market, time, the audit tag, the symbol.
_ENVELOPE_HEAD = re.compile(
    rb'^\{"market":"(\w+)","received_at_us":(\d+)(?:,"run":"([\w.-]+)","seq":(\d+))?'
    rb'(?:,"symbol":"([\w.-]*)")?,"frame":'
)


# The head of an envelope the stream process numbered (its audit tag, collector.audit): time, run, seq.
# Read without parsing the envelope, within its first HEAD_BYTES.
AUDIT_TAG: Final = re.compile(rb'^\{"market":"\w+","received_at_us":(\d+),"run":"([\w.-]+)","seq":(\d+),')
HEAD_BYTES: Final = 160


def tag_of(raw: bytes) -> tuple[str, int, int] | None:
    """(run, seq, received_at_us) of an audited envelope, None for the others. Pure."""
    match = AUDIT_TAG.match(raw, 0, HEAD_BYTES)
    if match is None:
        return None
    return match.group(2).decode(), int(match.group(3)), int(match.group(1))


class EnvelopeParts(NamedTuple):
    """What `make_envelope` wrapped; wrapping these again gives the envelope back byte for byte."""

    market: str
    received_at_us: int
    frame: bytes
    symbol: str | None
    run: str | None
    seq: int | None


def split_envelope(raw: bytes) -> EnvelopeParts | None:
    """The parts of an envelope `make_envelope` wrote, frame bytes untouched; None for anything else.

    Reads only the head: the frame itself need not be valid JSON (that is why it may be dead-lettered).
    """
    match = _ENVELOPE_HEAD.match(raw)
    if match is None or not raw.endswith(b"}"):
        return None
    market, received, run, seq, symbol = match.groups()
    return EnvelopeParts(
        market.decode(),
        int(received),
        raw[match.end() : -1],
        symbol.decode() if symbol is not None else None,
        run.decode() if run is not None else None,
        int(seq) if seq is not None else None,
    )


def open_envelope(raw: bytes) -> tuple[dict[str, Any], int]:
    """A queued envelope as a dict, with its receive time in µs; `FrameError` if it is not one."""
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise FrameError(f"envelope is not JSON: {error}") from None
    if type(envelope) is not dict:
        raise FrameError("envelope is not a JSON object")
    received_at = envelope.get("received_at_us")
    if type(received_at) is not int or received_at <= 0:
        raise FrameError(f"envelope received_at_us is {received_at!r}")
    return envelope, received_at


def extractor(table: str) -> Extractor:
    """The function that reads `table`'s rows out of an opened envelope."""
    try:
        return _EXTRACTORS[table]
    except KeyError:
        raise FrameError(f"no table named {table!r}") from None


def parse_envelope(table: str, raw: bytes, keep_coin_m: bool = False) -> ParsedEnvelope:
    """The rows `raw` (one queued envelope) contributes to `table`; `FrameError` if it cannot be stored."""
    envelope, received_at = open_envelope(raw)
    return extractor(table)(envelope, received_at, keep_coin_m)
