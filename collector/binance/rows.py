"""The rows of Binance's events and REST bodies, read from a queued envelope. Pure: dicts in, tuples out.

Each market table has a row type (`ROW_TYPES`) whose fields are its `collector.db.schema.COPY_COLUMNS`,
in that order (tests/test_rows.py holds them equal, so a reordered column cannot shift values silently).
Time columns are integer microseconds since the epoch (the staging table converts them), numbers
stay Binance's decimal strings, and `payload` is the event as JSON bytes. Anything that would make
PostgreSQL reject the batch is caught here and raised as `FrameError`, so one bad event goes to the
dead-letter list instead of blocking its queue.
Unknown keys are ignored: Binance adds fields (`nq`, `ap`, `ps`, `st`) without notice.
The envelope itself (how it is written, split and opened) is `collector.queue.envelope`'s; the gap
tables' rows are `collector.gaps.rows`'.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from collector.errors import FrameError

Row = tuple[Any, ...]  # one table's row: a row type below, or a gap row (collector.gaps.rows)


# --- the row of each market table: fields are its COPY columns, in order; times in µs since the epoch -----


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


ROW_TYPES: dict[str, type[tuple[Any, ...]]] = {
    "agg_trades": AggTradeRow,
    "depth_updates": DepthUpdateRow,
    "mark_prices": MarkPriceRow,
    "force_orders": ForceOrderRow,
    "open_interest": OpenInterestRow,
    "depth_snapshots": DepthSnapshotRow,
}

_BIGINT_MAX = 2**63 - 1
_SYMBOL = re.compile(r"^[A-Za-z0-9_\-]{1,40}$")
_WORD = re.compile(r"^[A-Za-z0-9_]{1,40}$")
_DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$")
# `st` (symbol type) appeared on futures payloads with the COIN-M merge on 2026-06-30: 1 = USD-M.
USD_M_SYMBOL_TYPE = 1


class ParsedEnvelope(NamedTuple):
    """The rows of one envelope, and how many all-market COIN-M rows were left out.

    A NamedTuple rather than a frozen dataclass: one is made per envelope, in the drain's hot loop.
    """

    rows: list[Row]
    skipped_coin_m: int = 0


def one_row(row: Row) -> ParsedEnvelope:
    """`ParsedEnvelope([row])` without NamedTuple's Python-level `__new__`: one is made per envelope."""
    return tuple.__new__(ParsedEnvelope, ([row], 0))


def int_field(event: dict[str, Any], key: str) -> int:
    """`event[key]` as an integer PostgreSQL's bigint holds, never negative; else `FrameError`."""
    value = event.get(key)
    if type(value) is not int or not 0 <= value <= _BIGINT_MAX:
        raise FrameError(f"field {key!r} is not a non-negative integer: {value!r}")
    return value


def opt_int_field(event: dict[str, Any], key: str) -> int | None:
    """`int_field`, or None when the key is missing or null."""
    value = event.get(key)
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= _BIGINT_MAX:  # int_field's check, inline
        raise FrameError(f"field {key!r} is not a non-negative integer: {value!r}")
    return value


def _ms_to_us(event: dict[str, Any], key: str) -> int:
    value = event.get(key)  # int_field's check, inline: three of these per trade
    if type(value) is not int or not 0 <= value <= _BIGINT_MAX:
        raise FrameError(f"field {key!r} is not a non-negative integer: {value!r}")
    return value * 1000


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


_SYMBOLS: dict[str, str] = {}  # symbols already checked, upper-cased: a few thousand at most
_SYMBOLS_KEPT = 20_000


def symbol_value(value: object) -> str:
    """A symbol name as Binance spells them, upper-cased; else `FrameError`."""
    if type(value) is str:
        known = _SYMBOLS.get(value)
        if known is not None:
            return known
    if not isinstance(value, str) or not _SYMBOL.match(value):
        raise FrameError(f"symbol is malformed: {value!r}")
    if len(_SYMBOLS) >= _SYMBOLS_KEPT:  # never in practice; bounded all the same
        _SYMBOLS.clear()
    known = _SYMBOLS[value] = value.upper()
    return known


def text_field(event: dict[str, Any], key: str) -> str:
    """`event[key]` as one short word (a side, a status, a cause); else `FrameError`."""
    value = event.get(key)
    if not isinstance(value, str) or not _WORD.match(value):
        raise FrameError(f"field {key!r} is not a word: {value!r}")
    return value


def _opt_text(event: dict[str, Any], key: str) -> str | None:
    return None if event.get(key) is None else text_field(event, key)


def _is_coin_m(event: dict[str, Any]) -> bool:
    symbol_type = event.get("st")
    return symbol_type is not None and symbol_type != USD_M_SYMBOL_TYPE


def _ws_data(envelope: dict[str, Any]) -> Any:
    frame = envelope.get("frame")
    if not isinstance(frame, dict) or "data" not in frame:
        raise FrameError("frame is not a combined-stream message with 'data'")
    return frame["data"]


def as_object(value: Any, what: str) -> dict[str, Any]:
    """`value` if it is a JSON object; else `FrameError` naming `what`."""
    if not isinstance(value, dict):
        raise FrameError(f"{what} is not a JSON object")
    return value


def _agg_trade(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    event = as_object(_ws_data(envelope), "aggTrade data")
    maker = event.get("m")
    row = AggTradeRow(
        _ms_to_us(event, "E"),
        envelope_market(envelope),
        symbol_value(event.get("s")),
        int_field(event, "a"),
        _ms_to_us(event, "T"),
        _decimal(event, "p"),
        _decimal(event, "q"),
        opt_int_field(event, "f"),
        opt_int_field(event, "l"),
        maker if isinstance(maker, bool) else None,
        received_at,
        orjson.dumps(event),
    )
    return one_row(row)


def _depth_update(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    event = as_object(_ws_data(envelope), "depthUpdate data")
    if not isinstance(event.get("b"), list) or not isinstance(event.get("a"), list):
        raise FrameError("depthUpdate has no 'b'/'a' level lists")
    row = DepthUpdateRow(
        _ms_to_us(event, "E"),
        envelope_market(envelope),
        symbol_value(event.get("s")),
        int_field(event, "U"),
        int_field(event, "u"),
        opt_int_field(event, "pu"),
        _opt_ms_to_us(event, "T"),
        received_at,
        orjson.dumps(event),
    )
    return one_row(row)


def _mark_prices(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    data = _ws_data(envelope)
    # `!markPrice@arr` frames are arrays; the per-symbol `@markPrice` stream sends one object.
    events = data if isinstance(data, list) else [data]
    rows: list[Row] = []
    skipped = 0
    for item in events:
        event = as_object(item, "markPriceUpdate")
        if not keep_coin_m and _is_coin_m(event):
            skipped += 1
            continue
        rows.append(
            MarkPriceRow(
                _ms_to_us(event, "E"),
                symbol_value(event.get("s")),
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
    event = as_object(_ws_data(envelope), "forceOrder data")
    if not keep_coin_m and _is_coin_m(event):
        return ParsedEnvelope([], 1)
    order = as_object(event.get("o"), "forceOrder 'o'")
    row = ForceOrderRow(
        _ms_to_us(event, "E"),
        _ms_to_us(order, "T"),
        symbol_value(order.get("s")),
        text_field(order, "S"),
        _decimal(order, "q"),
        _decimal(order, "p"),
        _opt_decimal(order, "ap"),
        _opt_text(order, "X"),
        _opt_decimal(order, "z"),
        received_at,
        orjson.dumps(event),
    )
    return one_row(row)


def _open_interest(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    body = as_object(envelope.get("frame"), "openInterest body")
    row = OpenInterestRow(
        received_at,
        symbol_value(body.get("symbol", envelope.get("symbol"))),
        _decimal(body, "openInterest"),
        _opt_ms_to_us(body, "time"),
        orjson.dumps(body),
    )
    return one_row(row)


def _depth_snapshot(envelope: dict[str, Any], received_at: int, keep_coin_m: bool) -> ParsedEnvelope:
    body = as_object(envelope.get("frame"), "depth body")
    if not isinstance(body.get("bids"), list) or not isinstance(body.get("asks"), list):
        raise FrameError("depth snapshot has no 'bids'/'asks'")
    row = DepthSnapshotRow(
        received_at,
        symbol_value(envelope.get("symbol")),
        envelope_market(envelope),
        int_field(body, "lastUpdateId"),
        _opt_ms_to_us(body, "E"),
        _opt_ms_to_us(body, "T"),
        orjson.dumps(body),
    )
    return one_row(row)


def envelope_market(envelope: dict[str, Any]) -> str:
    """The envelope's market, which must be one of Binance's two."""
    market = envelope.get("market")
    if market not in ("spot", "futures"):
        raise FrameError(f"envelope market is {market!r}, not spot or futures")
    return str(market)


# (envelope, its receive time in µs, keep COIN-M rows) -> the rows it contributes to one table.
Extractor = Callable[[dict[str, Any], int, bool], ParsedEnvelope]

EXTRACTORS: dict[str, Extractor] = {
    "agg_trades": _agg_trade,
    "depth_updates": _depth_update,
    "mark_prices": _mark_prices,
    "force_orders": _force_order,
    "open_interest": _open_interest,
    "depth_snapshots": _depth_snapshot,
}
