"""Pure part of `collector export`: what may be exported, argument checks, time parsing and the SQL."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from psycopg2 import sql

from collector.errors import ConfigError
from collector.settings import SYMBOL_PATTERN

Market = Literal["spot", "futures"]
Format = Literal["csv", "parquet"]
# How a PostgreSQL column travels to Parquet; anything not listed in PG_KINDS goes as text.
Kind = Literal[
    "timestamptz",
    "timestamp",
    "date",
    "int64",
    "int32",
    "int16",
    "float64",
    "float32",
    "decimal",
    "bool",
    "string",
]


@dataclass(frozen=True)
class Relation:
    """An exportable table or view: its time column and the column naming its market, if any."""

    name: str
    time_column: str
    market_column: str | None  # None: futures data only (no market column)
    # What `--symbol` compares with: a column, or for stream_gaps the symbol that starts its stream name
    # (`btcusdt@depth@100ms` -> BTCUSDT; a market-wide stream such as `!markPrice@arr` matches none).
    symbol_sql: str = "symbol"


# Time columns as in collector.db.schema.TIME_COLUMNS (a test keeps them equal); importing the schema
# would load SQLAlchemy, a quarter of a second on every export.
RELATIONS: Final = {
    r.name: r
    for r in (
        Relation("agg_trades", "trade_time", "market"),
        Relation("depth_updates", "event_time", "market"),
        Relation("depth_snapshots", "time", "market_type"),
        Relation("mark_prices", "event_time", None),
        Relation("force_orders", "transaction_time", None),
        Relation("open_interest", "time", None),
        # The one-minute aggregates that init-db creates (collector.db.aggregates).
        Relation("candles_1m", "bucket", "market"),
        Relation("liquidations_1m", "bucket", None),
        # The gap ledger (collector.gaps): what was not received.
        Relation("depth_gaps", "detected_at", "market"),
        Relation("stream_gaps", "started_at", "market", "upper(split_part(stream, '@', 1))"),
    )
}

# PostgreSQL type name (pg_type.typname) -> how the column is typed in Parquet.
PG_KINDS: Final[dict[str, Kind]] = {
    "timestamptz": "timestamptz",
    "timestamp": "timestamp",
    "date": "date",
    "int8": "int64",
    "int4": "int32",
    "int2": "int16",
    "float8": "float64",
    "float4": "float32",
    "numeric": "decimal",
    "bool": "bool",
    "text": "string",
    "varchar": "string",
    "jsonb": "string",
    "json": "string",
}

# Numerics go to Parquet as decimal128(38, 18): exact, 20 integer digits and 18 decimals, which holds
# every Binance price and quantity (at most 8 decimals) and their products. PostgreSQL rounds to it.
DECIMAL_PRECISION: Final = 38
DECIMAL_SCALE: Final = 18

# 11 digits or more: epoch milliseconds (13 digits from 2001 to 2286); 8 is an ISO basic date (20250101).
_EPOCH_MS = re.compile(r"^\d{11,}$")
TIME_HELP: Final = "an ISO 8601 date or date-time (naive means UTC) or epoch milliseconds"


@dataclass(frozen=True)
class Column:
    name: str
    pg_type: str  # pg_type.typname

    @property
    def kind(self) -> Kind:
        return PG_KINDS.get(self.pg_type, "string")


@dataclass(frozen=True)
class ExportPlan:
    """A checked export request: every field is valid on its own and with the others."""

    relation: Relation
    market: Market | None  # the filter to apply; None: no market filter
    symbol: str | None
    start: datetime | None  # inclusive, UTC
    end: datetime | None  # exclusive, UTC
    format: Format
    output: Path | None  # None: standard output


def parse_time(text: str, option: str) -> datetime:
    """An aware UTC datetime from an ISO 8601 date, date-time (naive = UTC) or epoch milliseconds."""
    value = text.strip()
    try:
        if _EPOCH_MS.match(value):
            return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
        parsed = datetime.fromisoformat(value)  # a date alone is its midnight
    except (ValueError, OverflowError, OSError):
        raise ConfigError(f"{option}: cannot read {text!r} as a time; give {TIME_HELP}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def resolve_relation(name: str) -> Relation:
    relation = RELATIONS.get(name)
    if relation is None:
        raise ConfigError(
            f"cannot export {name!r}: not a known table or view (one of {', '.join(RELATIONS)})"
        )
    return relation


def resolve_market(relation: Relation, market: Market | None) -> Market | None:
    """The market filter to apply; futures-only relations accept `futures` and need no filter."""
    if market is None or relation.market_column is not None:
        return market
    if market == "futures":
        return None
    raise ConfigError(f"--market {market}: {relation.name} holds futures data only (it has no market column)")


def resolve_format(fmt: Format | None, output: str | None) -> Format:
    if fmt is not None:
        return fmt
    return "parquet" if output is not None and output.lower().endswith(".parquet") else "csv"


def plan_export(
    relation: str,
    market: Market | None = None,
    symbol: str | None = None,
    start: str | None = None,
    end: str | None = None,
    fmt: Format | None = None,
    output: str | None = None,
) -> ExportPlan:
    """Check the command-line arguments; raise `ConfigError` with one line on the first bad one."""
    target = resolve_relation(relation)
    if symbol is not None:
        symbol = symbol.strip().upper()  # Binance stores symbols upper-case
        if not SYMBOL_PATTERN.match(symbol):
            raise ConfigError(f"--symbol: {symbol!r} is not a Binance symbol (like BTCUSDT)")
    start_at = parse_time(start, "--from") if start is not None else None
    end_at = parse_time(end, "--to") if end is not None else None
    if start_at is not None and end_at is not None and start_at >= end_at:
        raise ConfigError(f"--from {start_at.isoformat()} is not before --to {end_at.isoformat()}")
    out = None if output is None or output == "-" else Path(output)
    chosen = resolve_format(fmt, output)
    if chosen == "parquet" and out is None:
        raise ConfigError("parquet cannot go to standard output: give a file with -o FILE")
    return ExportPlan(target, resolve_market(target, market), symbol, start_at, end_at, chosen, out)


def _where(plan: ExportPlan, *, with_times: bool = True) -> sql.Composable:
    conditions: list[sql.Composable] = []
    if plan.market is not None and plan.relation.market_column is not None:
        conditions.append(
            sql.SQL("{} = {}").format(sql.Identifier(plan.relation.market_column), sql.Literal(plan.market))
        )
    if plan.symbol is not None:
        conditions.append(
            sql.SQL("{} = {}").format(sql.SQL(plan.relation.symbol_sql), sql.Literal(plan.symbol))
        )
    time_column = sql.Identifier(plan.relation.time_column)
    if with_times and plan.start is not None:
        conditions.append(sql.SQL("{} >= {}").format(time_column, sql.Literal(plan.start)))
    if with_times and plan.end is not None:
        conditions.append(sql.SQL("{} < {}").format(time_column, sql.Literal(plan.end)))
    if not conditions:
        return sql.SQL("")
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions)


def select_expression(column: Column, fmt: Format) -> sql.Composable:
    """A column as the SELECT list gives it: numerics fitted to the Parquet decimal, odd types as text."""
    name = sql.Identifier(column.name)
    if fmt == "parquet" and column.kind == "decimal":
        cast = sql.SQL(f"numeric({DECIMAL_PRECISION},{DECIMAL_SCALE})")
        return sql.SQL("{}::{} AS {}").format(name, cast, name)
    if fmt == "parquet" and column.pg_type not in PG_KINDS:
        return sql.SQL("{}::text AS {}").format(name, name)
    return name


def select_statement(plan: ExportPlan, columns: list[Column]) -> sql.Composed:
    """The rows of the export: filtered, in time order, each column as the format wants it."""
    return sql.SQL("SELECT {} FROM {}{} ORDER BY {}").format(
        sql.SQL(", ").join(select_expression(c, plan.format) for c in columns),
        sql.Identifier(plan.relation.name),
        _where(plan),
        sql.Identifier(plan.relation.time_column),
    )


def copy_statement(plan: ExportPlan, columns: list[Column]) -> sql.Composed:
    """`COPY (SELECT …) TO STDOUT` in CSV, with a header line for CSV output only.

    COPY takes no bind parameters, so values are `sql.Literal`s, quoted by psycopg2 when rendered.
    """
    options = "FORMAT csv, HEADER" if plan.format == "csv" else "FORMAT csv"
    return sql.SQL("COPY ({}) TO STDOUT WITH ({})").format(select_statement(plan, columns), sql.SQL(options))


def symbol_exists_sql(plan: ExportPlan) -> sql.Composed:
    """Whether the symbol has any row at all (market filter kept, time window dropped)."""
    return sql.SQL("SELECT EXISTS (SELECT 1 FROM {}{})").format(
        sql.Identifier(plan.relation.name), _where(plan, with_times=False)
    )


def no_rows_message(plan: ExportPlan) -> str:
    market = f" ({plan.market})" if plan.market is not None else ""
    return f"no rows for symbol {plan.symbol}{market} in {plan.relation.name}"
