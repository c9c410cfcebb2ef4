"""The ready-made aggregates researchers query first: `candles_1m` and `liquidations_1m`.

Each is defined once, here, as plain data: a source table, its time column, the grouping columns
and the measures. `plain_view_sql` renders it as an ordinary PostgreSQL view (computed at query
time); `collector.db.timescale` renders the same definition as a continuous aggregate. Both give
the same column names, types and values, so every query in docs/schema.md works on either database.

Bucket boundaries: one-minute buckets aligned on UTC minutes. `time_bucket('1 minute', t)` and
`date_bin('1 minute', t, '2000-01-01 00:00+00')` give the same instant for every `t`, whatever
the session's time zone (unlike `date_trunc` on a timestamptz).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Function = Literal["first", "last", "max", "min", "sum", "count"]

BUCKET_WIDTH: Final = "1 minute"
BUCKET_ORIGIN: Final = "2000-01-01 00:00:00+00"  # any UTC minute boundary; this is time_bucket's own


@dataclass(frozen=True)
class Measure:
    """One output column: `function(expression)`; `first`/`last` follow the aggregate's order column."""

    name: str
    function: Function
    expression: str
    cast: str | None = None  # applied to the aggregate's result, e.g. a sum of counts as bigint


@dataclass(frozen=True)
class Aggregate:
    name: str
    source: str  # the market-data table it reads
    time_column: str  # of the source; bucketed into the output column `bucket`
    group_by: tuple[str, ...]  # output columns before `bucket`
    order_column: str  # what "first" and "last" mean: the exchange's own order of events
    measures: tuple[Measure, ...]


CANDLES_1M: Final = Aggregate(
    name="candles_1m",
    source="agg_trades",
    time_column="trade_time",
    group_by=("market", "symbol"),
    # Aggregate trade ids increase with every trade of a symbol; several trades share one
    # millisecond, so the id (not trade_time) decides which one opened and closed the minute.
    order_column="aggregate_trade_id",
    measures=(
        Measure("open", "first", "price"),
        Measure("high", "max", "price"),
        Measure("low", "min", "price"),
        Measure("close", "last", "price"),
        Measure("volume", "sum", "quantity"),  # base asset
        Measure("quote_volume", "sum", "price * quantity"),
        # An aggregate trade bundles the fills `f`..`l`; Binance's klines count fills.
        Measure("trade_count", "sum", "COALESCE(last_trade_id - first_trade_id + 1, 1)", cast="bigint"),
        Measure("agg_trade_count", "count", "*"),
        # `m` true: the buyer was the maker, so the taker sold. Taker buys are the other ones.
        Measure("taker_buy_volume", "sum", "CASE WHEN is_buyer_maker THEN 0 ELSE quantity END"),
        Measure("taker_buy_quote_volume", "sum", "CASE WHEN is_buyer_maker THEN 0 ELSE price * quantity END"),
    ),
)

LIQUIDATIONS_1M: Final = Aggregate(
    name="liquidations_1m",
    source="force_orders",
    time_column="transaction_time",
    group_by=("symbol", "side"),
    order_column="transaction_time",
    measures=(
        Measure("count", "count", "*"),
        Measure("quantity", "sum", "quantity"),
        # price * quantity, as the alert rules compute a liquidation's size (collector.alerts.rules).
        Measure("notional", "sum", "price * quantity"),
    ),
)

AGGREGATES: Final = (CANDLES_1M, LIQUIDATIONS_1M)


def output_columns(aggregate: Aggregate) -> list[str]:
    return [*aggregate.group_by, "bucket", *(m.name for m in aggregate.measures)]


def measure_sql(measure: Measure, order_column: str, *, timescale: bool) -> str:
    """The SQL of one measure; first/last use TimescaleDB's functions or an ordered array_agg."""
    if measure.function in ("first", "last") and timescale:
        sql = f"{measure.function}({measure.expression}, {order_column})"
    elif measure.function in ("first", "last"):
        direction = "" if measure.function == "first" else " DESC"
        sql = f"(array_agg({measure.expression} ORDER BY {order_column}{direction}))[1]"
    else:
        sql = f"{measure.function}({measure.expression})"
    return f"({sql})::{measure.cast}" if measure.cast else sql


def select_sql(aggregate: Aggregate, bucket_sql: str, *, timescale: bool) -> str:
    """The SELECT both renderings share; only the bucket expression and first/last differ."""
    columns = [
        *aggregate.group_by,
        f"{bucket_sql} AS bucket",
        *(
            f"{measure_sql(m, aggregate.order_column, timescale=timescale)} AS {m.name}"
            for m in aggregate.measures
        ),
    ]
    group = ", ".join([*aggregate.group_by, "bucket"])
    return f"SELECT {', '.join(columns)} FROM {aggregate.source} GROUP BY {group}"


def plain_view_sql(aggregate: Aggregate) -> str:
    bucket = f"date_bin('{BUCKET_WIDTH}', {aggregate.time_column}, TIMESTAMPTZ '{BUCKET_ORIGIN}')"
    return f"CREATE VIEW {aggregate.name} AS {select_sql(aggregate, bucket, timescale=False)}"
