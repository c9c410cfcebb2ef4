"""Row types: each table's fields are its COPY columns, in order, and every value lands in its own field."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from collector.db.schema import COPY_COLUMNS
from collector.queue import keys
from collector.queue.envelope import ROW_TYPES, make_envelope, parse_envelope

RECEIVED_US = 5_000


@pytest.mark.parametrize("table", sorted(COPY_COLUMNS))
def test_row_type_fields_are_the_copy_columns_in_order(table: str) -> None:
    """A column added, dropped or moved in the schema fails here, not as values shifted into another."""
    assert ROW_TYPES[table]._fields == COPY_COLUMNS[table]  # type: ignore[attr-defined]


def test_every_drained_table_has_a_row_type() -> None:
    """The queues, the row types and the COPY columns name the same tables."""
    assert set(ROW_TYPES) == set(COPY_COLUMNS) == set(keys.TABLES)


def _ws(stream: str, data: Any) -> bytes:
    return orjson.dumps({"stream": stream, "data": data})


# One event per table whose every field has a value of its own, and the row it must give, by name.
CASES: dict[str, tuple[bytes, dict[str, Any]]] = {
    "agg_trades": (
        make_envelope(
            "futures",
            RECEIVED_US,
            _ws(
                "btcusdt@aggTrade",
                {"e": "aggTrade", "E": 1001, "s": "BTCUSDT", "a": 11, "p": "1.5", "q": "2.5", "f": 21,
                 "l": 22, "T": 1002, "m": True},
            ),
        ),
        {"event_time": 1_001_000, "market": "futures", "symbol": "BTCUSDT", "aggregate_trade_id": 11,
         "trade_time": 1_002_000, "price": "1.5", "quantity": "2.5", "first_trade_id": 21,
         "last_trade_id": 22, "is_buyer_maker": True, "received_at": RECEIVED_US},
    ),
    "depth_updates": (
        make_envelope(
            "futures",
            RECEIVED_US,
            _ws(
                "ethusdt@depth@100ms",
                {"e": "depthUpdate", "E": 1001, "T": 1002, "s": "ETHUSDT", "U": 31, "u": 32, "pu": 30,
                 "b": [], "a": []},
            ),
        ),
        {"event_time": 1_001_000, "market": "futures", "symbol": "ETHUSDT", "first_update_id": 31,
         "final_update_id": 32, "previous_final_update_id": 30, "transaction_time": 1_002_000,
         "received_at": RECEIVED_US},
    ),
    "mark_prices": (
        make_envelope(
            "futures",
            RECEIVED_US,
            _ws(
                "!markPrice@arr@1s",
                [{"e": "markPriceUpdate", "E": 1001, "s": "BTCUSDT", "p": "1.1", "i": "2.2", "P": "3.3",
                  "r": "0.0004", "T": 1002, "st": 1}],
            ),
        ),
        {"event_time": 1_001_000, "symbol": "BTCUSDT", "mark_price": "1.1", "index_price": "2.2",
         "estimated_settle_price": "3.3", "funding_rate": "0.0004", "next_funding_time": 1_002_000,
         "received_at": RECEIVED_US},
    ),
    "force_orders": (
        make_envelope(
            "futures",
            RECEIVED_US,
            _ws(
                "!forceOrder@arr",
                {"e": "forceOrder", "E": 1001, "o": {"s": "BTCUSDT", "S": "SELL", "q": "1.1", "p": "2.2",
                 "ap": "3.3", "X": "FILLED", "z": "4.4", "T": 1002}},
            ),
        ),
        {"event_time": 1_001_000, "transaction_time": 1_002_000, "symbol": "BTCUSDT", "side": "SELL",
         "quantity": "1.1", "price": "2.2", "average_price": "3.3", "order_status": "FILLED",
         "filled_quantity": "4.4", "received_at": RECEIVED_US},
    ),
    "open_interest": (
        make_envelope(
            "futures",
            RECEIVED_US,
            orjson.dumps({"openInterest": "7.7", "symbol": "BTCUSDT", "time": 1001}),
            symbol="BTCUSDT",
        ),
        {"time": RECEIVED_US, "symbol": "BTCUSDT", "open_interest": "7.7", "exchange_time": 1_001_000},
    ),
    "depth_snapshots": (
        make_envelope(
            "futures",
            RECEIVED_US,
            orjson.dumps({"lastUpdateId": 41, "E": 1001, "T": 1002, "bids": [], "asks": []}),
            symbol="BTCUSDT",
        ),
        {"time": RECEIVED_US, "symbol": "BTCUSDT", "market_type": "futures", "last_update_id": 41,
         "event_time": 1_001_000, "transaction_time": 1_002_000},
    ),
    "depth_gaps": (
        make_envelope(
            "spot",
            RECEIVED_US,
            orjson.dumps({"symbol": "BTCUSDT", "detected_at_us": 7001, "last_update_id": 51,
                          "next_update_id": 53, "resynced_at_us": 7002, "resync_update_id": 54,
                          "cause": "sequence"}),
        ),
        {"detected_at": 7001, "market": "spot", "symbol": "BTCUSDT", "last_update_id": 51,
         "next_update_id": 53, "resynced_at": 7002, "resync_update_id": 54, "cause": "sequence"},
    ),
    "stream_gaps": (
        make_envelope(
            "spot",
            RECEIVED_US,
            orjson.dumps({"stream": "btcusdt@aggTrade", "started_at_us": 8001, "ended_at_us": 8002,
                          "cause": "disconnect", "connection": "spot-0"}),
        ),
        {"started_at": 8001, "market": "spot", "stream": "btcusdt@aggTrade", "ended_at": 8002,
         "cause": "disconnect", "connection": "spot-0"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("table", sorted(CASES))
def test_every_value_lands_in_its_named_column(table: str) -> None:
    """Each extractor fills its row type field by field: no two values of the same type are swapped."""
    envelope, expected = CASES[table]
    (row,) = parse_envelope(table, envelope, keep_coin_m=False).rows
    assert type(row) is ROW_TYPES[table]
    values = row._asdict()  # type: ignore[attr-defined]
    values.pop("payload", None)
    assert values == expected
