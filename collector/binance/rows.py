"""Turn one queued envelope into the rows of its table. Pure: bytes in, named tuples out.

Each table has a row type (`ROW_TYPES`) whose fields are its `collector.db.schema.COPY_COLUMNS`, in
that order (tests/test_rows.py holds them equal, so a reordered column cannot shift values silently).
Time columns are integer microseconds since the epoch (the staging table converts them), numbers
stay Binance's decimal strings, and `payload` is the event as JSON bytes. Anything that would make
PostgreSQL reject the batch is caught here and raised as `FrameError`, so one bad event goes to the
dead-letter list instead of blocking its queue.
Unknown keys are ignored: Binance adds fields (`nq`, `ap`, `ps`, `st`) without notice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from collector.errors import FrameError

Row = tuple[Any, ...]  # one of the row types below


# --- the row of each table: fields are its COPY columns, in order; times in µs since the epoch -----


class AggTradeRow(NamedTuple):
    event_time: int  # E
    market: str
    symbol: str  # s
    aggregate_trade_id: int  # a
    trade_time: int  # T
    price: str  # p
    quantity: str  # q
    first_trade_id: int | None  # f
    last_trade_id: int | None  # l
    is_buyer_maker: bool | None  # m
    received_at: int
    payload: bytes


class DepthUpdateRow(NamedTuple):
    event_time: int  # E
    market: str
    symbol: str  # s
    first_update_id: int  # U
    final_update_id: int  # u
    previous_final_update_id: int | None  # pu (futures only)
    transaction_time: int | None  # T (futures only)
    received_at: int
    payload: bytes


class MarkPriceRow(NamedTuple):
    event_time: int  # E
    symbol: str  # s
    mark_price: str | None  # p
    index_price: str | None  # i
    estimated_settle_price: str | None  # P
    funding_rate: str | None  # r
    next_funding_time: int | None  # T
    received_at: int
    payload: bytes


class ForceOrderRow(NamedTuple):
    event_time: int  # E
    transaction_time: int  # o.T
    symbol: str  # o.s
    side: str  # o.S
    quantity: str  # o.q
    price: str  # o.p
    average_price: str | None  # o.ap
    order_status: str | None  # o.X
    filled_quantity: str | None  # o.z
    received_at: int
    payload: bytes


class OpenInterestRow(NamedTuple):
    time: int  # the receive time
    symbol: str  # symbol
    open_interest: str  # openInterest
    exchange_time: int | None  # time
    payload: bytes


class DepthSnapshotRow(NamedTuple):
    time: int  # the receive time
    symbol: str  # asked for (spot bodies do not name it)
    market_type: str
    last_update_id: int  # lastUpdateId
    event_time: int | None  # E (futures only)
    transaction_time: int | None  # T (futures only)
    payload: bytes


class DepthGapRow(NamedTuple):
    detected_at: int
    market: str
    symbol: str
    last_update_id: int | None
    next_update_id: int | None
    resynced_at: int | None
    resync_update_id: int | None
    cause: str


class StreamGapRow(NamedTuple):
    started_at: int
    market: str
    stream: str
    ended_at: int | None
    cause: str
    connection: str | None


ROW_TYPES: dict[str, type[tuple[Any, ...]]] = {
    "agg_trades": AggTradeRow,
    "depth_updates": DepthUpdateRow,
    "mark_prices": MarkPriceRow,
    "force_orders": ForceOrderRow,
    "open_interest": OpenInterestRow,
    "depth_snapshots": DepthSnapshotRow,
    "depth_gaps": DepthGapRow,
    "stream_gaps": StreamGapRow,
}

_BIGINT_MAX = 2**63 - 1
_SYMBOL = re.compile(r"^[A-Za-z0-9_\-]{1,40}$")
_WORD = re.compile(r"^[A-Za-z0-9_]{1,40}$")
_DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$")
# `st` (symbol type) appeared on futures payloads with the COIN-M merge on 2026-06-30: 1 = USD-M.
USD_M_SYMBOL_TYPE = 1


@dataclass(frozen=True)
class ParsedEnvelope:
    """The rows of one envelope, and how many all-market COIN-M rows were left out."""

    rows: list[Row]
    skipped_coin_m: int = 0


def _int(event: dict[str, Any], key: str) -> int:
    value = event.get(key)
    if type(value) is not int or not 0 <= value <= _BIGINT_MAX:
        raise FrameError(f"field {key!r} is not a non-negative integer: {value!r}")
    return value


def _opt_int(event: dict[str, Any], key: str) -> int | None:
    return None if event.get(key) is None else _int(event, key)


def _ms_to_us(event: dict[str, Any], key: str) -> int:
    return _int(event, key) * 1000


def _opt_ms_to_us(event: dict[str, Any], key: str) -> int | None:
    """Optional time; Binance writes 0 for "none scheduled" (markPrice `T` of delisted contracts)."""
    value = event.get(key)
    if value is None or value == 0:
        return None
    return _ms_to_us(event, key)


def _decimal(event: dict[str, Any], key: str) -> str:
    value = event.get(key)
    if not isinstance(value, str) or not _DECIMAL.match(value):
        raise FrameError(f"field {key!r} is not a decimal string: {value!r}")
    return value


def _opt_decimal(event: dict[str, Any], key: str) -> str | None:
    return None if event.get(key) is None else _decimal(event, key)


def _symbol(value: object) -> str:
    if not isinstance(value, str) or not _SYMBOL.match(value):
        raise FrameError(f"symbol is malformed: {value!r}")
    return value.upper()


def _text(event: dict[str, Any], key: str) -> str:
    value = event.get(key)
    if not isinstance(value, str) or not _WORD.match(value):
        raise FrameError(f"field {key!r} is not a word: {value!r}")
    return value


def _opt_text(event: dict[str, Any], key: str) -> str | None:
    return None if event.get(key) is None else _text(event, key)


def _is_coin_m(event: dict[str, Any]) -> bool:
    symbol_type = event.get("st")
    return symbol_type is not None and symbol_type != USD_M_SYMBOL_TYPE


def _ws_data(envelope: dict[str, Any]) -> Any:
    frame = envelope.get("frame")
    if not isinstance(frame, dict) or "data" not in frame:
        raise FrameError("frame is not a combined-stream message with 'data'")
    return frame["data"]


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FrameError(f"{what} is not a JSON object")
    return value


def _agg_trade(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    event = _object(_ws_data(envelope), "aggTrade data")
    maker = event.get("m")
    row = AggTradeRow(
        _ms_to_us(event, "E"),
        _market(envelope),
        _symbol(event.get("s")),
        _int(event, "a"),
        _ms_to_us(event, "T"),
        _decimal(event, "p"),
        _decimal(event, "q"),
        _opt_int(event, "f"),
        _opt_int(event, "l"),
        maker if isinstance(maker, bool) else None,
        received_at,
        orjson.dumps(event),
    )
    return ParsedEnvelope([row])


def _depth_update(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    event = _object(_ws_data(envelope), "depthUpdate data")
    if not isinstance(event.get("b"), list) or not isinstance(event.get("a"), list):
        raise FrameError("depthUpdate has no 'b'/'a' level lists")
    row = DepthUpdateRow(
        _ms_to_us(event, "E"),
        _market(envelope),
        _symbol(event.get("s")),
        _int(event, "U"),
        _int(event, "u"),
        _opt_int(event, "pu"),
        _opt_ms_to_us(event, "T"),
        received_at,
        orjson.dumps(event),
    )
    return ParsedEnvelope([row])


def _mark_prices(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    data = _ws_data(envelope)
    # `!markPrice@arr` frames are arrays; the per-symbol `@markPrice` stream sends one object.
    events = data if isinstance(data, list) else [data]
    rows: list[Row] = []
    skipped = 0
    for item in events:
        event = _object(item, "markPriceUpdate")
        if not keep_coin_m and _is_coin_m(event):
            skipped += 1
            continue
        rows.append(
            MarkPriceRow(
                _ms_to_us(event, "E"),
                _symbol(event.get("s")),
                _opt_decimal(event, "p"),
                _opt_decimal(event, "i"),
                _opt_decimal(event, "P"),
                _opt_decimal(event, "r"),
                _opt_ms_to_us(event, "T"),
                received_at,
                orjson.dumps(event),
            )
        )
    return ParsedEnvelope(rows, skipped)


def _force_order(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    event = _object(_ws_data(envelope), "forceOrder data")
    if not keep_coin_m and _is_coin_m(event):
        return ParsedEnvelope([], 1)
    order = _object(event.get("o"), "forceOrder 'o'")
    row = ForceOrderRow(
        _ms_to_us(event, "E"),
        _ms_to_us(order, "T"),
        _symbol(order.get("s")),
        _text(order, "S"),
        _decimal(order, "q"),
        _decimal(order, "p"),
        _opt_decimal(order, "ap"),
        _opt_text(order, "X"),
        _opt_decimal(order, "z"),
        received_at,
        orjson.dumps(event),
    )
    return ParsedEnvelope([row])


def _open_interest(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    body = _object(envelope.get("frame"), "openInterest body")
    row = OpenInterestRow(
        received_at,
        _symbol(body.get("symbol", envelope.get("symbol"))),
        _decimal(body, "openInterest"),
        _opt_ms_to_us(body, "time"),
        orjson.dumps(body),
    )
    return ParsedEnvelope([row])


def _depth_snapshot(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    body = _object(envelope.get("frame"), "depth body")
    if not isinstance(body.get("bids"), list) or not isinstance(body.get("asks"), list):
        raise FrameError("depth snapshot has no 'bids'/'asks'")
    row = DepthSnapshotRow(
        received_at,
        _symbol(envelope.get("symbol")),
        _market(envelope),
        _int(body, "lastUpdateId"),
        _opt_ms_to_us(body, "E"),
        _opt_ms_to_us(body, "T"),
        orjson.dumps(body),
    )
    return ParsedEnvelope([row])


def _opt_us(record: dict[str, Any], key: str) -> int | None:
    return None if record.get(key) is None else _int(record, key)


def _depth_gap(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    """A gap record of the stream process (collector.gaps.records.DepthGap)."""
    record = _object(envelope.get("frame"), "depth gap record")
    row = DepthGapRow(
        _int(record, "detected_at_us"),
        _market(envelope),
        _symbol(record.get("symbol")),
        _opt_int(record, "last_update_id"),
        _opt_int(record, "next_update_id"),
        _opt_us(record, "resynced_at_us"),
        _opt_int(record, "resync_update_id"),
        _text(record, "cause"),
    )
    return ParsedEnvelope([row])


def _stream_gap(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    """A gap record of the stream process (collector.gaps.records.StreamGap)."""
    record = _object(envelope.get("frame"), "stream gap record")
    stream = record.get("stream")
    if not isinstance(stream, str) or not stream or len(stream) > 200:
        raise FrameError(f"stream gap record has no stream name: {stream!r}")
    connection = record.get("connection")
    row = StreamGapRow(
        _int(record, "started_at_us"),
        _market(envelope),
        stream,
        _opt_us(record, "ended_at_us"),
        _text(record, "cause"),
        connection if isinstance(connection, str) else None,
    )
    return ParsedEnvelope([row])


def _market(envelope: dict[str, Any]) -> str:
    market = envelope.get("market")
    if market not in ("spot", "futures"):
        raise FrameError(f"envelope market is {market!r}, not spot or futures")
    return str(market)


_EXTRACTORS: dict[str, Callable[[dict[str, Any], int, bool], ParsedEnvelope]] = {
    "agg_trades": _agg_trade,
    "depth_updates": _depth_update,
    "mark_prices": _mark_prices,
    "force_orders": _force_order,
    "open_interest": _open_interest,
    "depth_snapshots": _depth_snapshot,
    "depth_gaps": _depth_gap,
    "stream_gaps": _stream_gap,
}


def parse_envelope(table: str, raw: bytes, keep_coin_m: bool = False) -> ParsedEnvelope:
    """The rows `raw` (one queued envelope) contributes to `table`; `FrameError` if it cannot be stored."""
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise FrameError(f"envelope is not JSON: {error}") from None
    if not isinstance(envelope, dict):
        raise FrameError("envelope is not a JSON object")
    received_at = envelope.get("received_at_us")
    if type(received_at) is not int or received_at <= 0:
        raise FrameError(f"envelope received_at_us is {received_at!r}")
    try:
        return _EXTRACTORS[table](envelope, received_at, keep_coin_m)
    except KeyError:
        raise FrameError(f"no table named {table!r}") from None


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
