"""SQLAlchemy definitions of the six market-data tables, the gap ledger and the alert bookkeeping.

Each market-data table keeps the spec's columns, typed columns beside the JSONB `payload`, the
local `received_at`, and a natural unique key (`NATURAL_KEYS`) so that a replayed batch inserts
nothing twice. TimescaleDB requires the partitioning column in every unique index, so each key
contains its table's `TIME_COLUMNS` entry; those columns come from the exchange (or, for REST rows,
from the receive time fixed in the envelope), so a replay reproduces them exactly.
"""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Identity,
    Index,
    MetaData,
    Numeric,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()


def _ts(name: str, nullable: bool = False) -> Column[Any]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


agg_trades = Table(
    "agg_trades",
    metadata,
    _ts("event_time"),  # E
    Column("market", Text, nullable=False),
    Column("symbol", Text, nullable=False),  # s
    Column("aggregate_trade_id", BigInteger, nullable=False),  # a
    _ts("trade_time"),  # T: the trade's own time, identical on every connection that carries it
    Column("price", Numeric, nullable=False),  # p
    Column("quantity", Numeric, nullable=False),  # q
    Column("first_trade_id", BigInteger),  # f
    Column("last_trade_id", BigInteger),  # l
    Column("is_buyer_maker", Boolean),  # m
    _ts("received_at"),
    Column("payload", JSONB, nullable=False),
    UniqueConstraint("market", "symbol", "aggregate_trade_id", "trade_time", name="agg_trades_natural_key"),
)

depth_updates = Table(
    "depth_updates",
    metadata,
    _ts("event_time"),  # E
    Column("market", Text, nullable=False),
    Column("symbol", Text, nullable=False),  # s
    Column("first_update_id", BigInteger, nullable=False),  # U
    Column("final_update_id", BigInteger, nullable=False),  # u
    Column("previous_final_update_id", BigInteger),  # pu (futures only)
    _ts("transaction_time", nullable=True),  # T (futures only): matching-engine time
    _ts("received_at"),
    Column("payload", JSONB, nullable=False),
    UniqueConstraint("market", "symbol", "final_update_id", "event_time", name="depth_updates_natural_key"),
)

mark_prices = Table(
    "mark_prices",
    metadata,
    _ts("event_time"),  # E
    Column("symbol", Text, nullable=False),  # s
    Column("mark_price", Numeric),  # p
    Column("index_price", Numeric),  # i
    Column("estimated_settle_price", Numeric),  # P
    Column("funding_rate", Numeric),  # r
    _ts("next_funding_time", nullable=True),  # T (0 when no funding is scheduled -> NULL)
    _ts("received_at"),
    Column("payload", JSONB, nullable=False),
    UniqueConstraint("symbol", "event_time", name="mark_prices_natural_key"),
)

force_orders = Table(
    "force_orders",
    metadata,
    _ts("event_time"),  # E
    _ts("transaction_time"),  # o.T
    Column("symbol", Text, nullable=False),  # o.s
    Column("side", Text, nullable=False),  # o.S
    Column("quantity", Numeric, nullable=False),  # o.q
    Column("price", Numeric, nullable=False),  # o.p
    Column("average_price", Numeric),  # o.ap
    Column("order_status", Text),  # o.X
    Column("filled_quantity", Numeric),  # o.z
    _ts("received_at"),
    Column("payload", JSONB, nullable=False),
    # Commit order of inserts (drains of one table never overlap): the alert task's cursor.
    Column("ingest_seq", BigInteger, Identity(always=False), nullable=False),
    UniqueConstraint(
        "symbol", "side", "transaction_time", "price", "quantity", name="force_orders_natural_key"
    ),
    Index("force_orders_ingest_seq", "ingest_seq"),
)

open_interest = Table(
    "open_interest",
    metadata,
    _ts("time"),  # receive time, fixed in the envelope when the response arrived
    Column("symbol", Text, nullable=False),  # symbol
    Column("open_interest", Numeric, nullable=False),  # openInterest
    _ts("exchange_time", nullable=True),  # time
    Column("payload", JSONB, nullable=False),
    UniqueConstraint("symbol", "time", name="open_interest_natural_key"),
)

depth_snapshots = Table(
    "depth_snapshots",
    metadata,
    _ts("time"),  # receive time, fixed in the envelope
    Column("symbol", Text, nullable=False),
    Column("market_type", Text, nullable=False),
    Column("last_update_id", BigInteger, nullable=False),  # lastUpdateId
    _ts("event_time", nullable=True),  # E (futures only)
    _ts("transaction_time", nullable=True),  # T (futures only)
    Column("payload", JSONB, nullable=False),
    UniqueConstraint("market_type", "symbol", "last_update_id", "time", name="depth_snapshots_natural_key"),
)

# --- the gap ledger: what was NOT received -------------------------------------------------------
# Written by the stream process (through the same Redis queues and drains as the market data). A gap
# is queued when it opens and again when it closes; both carry the natural key, and the drain merges
# the second into the first (`UPSERT_COLUMNS`), so the order and repetition of deliveries do not matter.

depth_gaps = Table(
    "depth_gaps",
    metadata,
    _ts("detected_at"),  # when the stream process saw the break
    Column("market", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("last_update_id", BigInteger),  # last good `u` before the hole (NULL: not known)
    Column("next_update_id", BigInteger),  # `U` of the first event after the hole
    _ts("resynced_at", nullable=True),  # when a snapshot that lines up with the diffs was stored
    Column("resync_update_id", BigInteger),  # that snapshot's lastUpdateId
    Column("cause", Text, nullable=False),  # sequence, reconnect, startup, ...
    UniqueConstraint("market", "symbol", "detected_at", name="depth_gaps_natural_key"),
)

stream_gaps = Table(
    "stream_gaps",
    metadata,
    _ts("started_at"),  # the last frame the connection delivered before it stopped receiving
    Column("market", Text, nullable=False),
    Column("stream", Text, nullable=False),
    _ts("ended_at", nullable=True),  # the replacement connection was open (NULL: still open)
    Column("cause", Text, nullable=False),  # disconnect, server_shutdown, idle, shutdown, ...
    Column("connection", Text),  # the connection that lost it
    UniqueConstraint("market", "stream", "started_at", name="stream_gaps_natural_key"),
)

# What each drain batch consumed of the stream process's numbered envelopes (collector.audit): a hole
# between ranges is envelopes lost between the stream process and PostgreSQL.
ingest_ranges = Table(
    "ingest_ranges",
    metadata,
    Column("table_name", Text, nullable=False),
    Column("run", Text, nullable=False),  # the stream process run that numbered them
    Column("first_seq", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    _ts("first_received_at"),
    _ts("last_received_at"),
    # What the batch made of its envelopes (on the batch's first range; 0 on the others).
    Column("rows_inserted", BigInteger, nullable=False, server_default="0"),
    Column("rows_duplicate", BigInteger, nullable=False, server_default="0"),
    Column("rows_filtered", BigInteger, nullable=False, server_default="0"),  # COIN-M left out
    Column("dead_letters", BigInteger, nullable=False, server_default="0"),
    Index("ingest_ranges_by_run", "table_name", "run", "first_seq"),
    Index("ingest_ranges_by_time", "last_received_at"),
)

# Alerts already decided; `alert_key` names the liquidation(s) that fired it, so a retried
# evaluation cannot create a second alert for them.
alerts = Table(
    "alerts",
    metadata,
    Column("alert_id", BigInteger, Identity(always=False), primary_key=True),
    Column("alert_key", Text, nullable=False, unique=True),
    _ts("created_at"),
    _ts("liquidation_time"),
    Column("rule", Text, nullable=False),
    Column("symbol", Text, nullable=False),
    Column("side", Text, nullable=False),
    Column("quantity", Numeric, nullable=False),
    Column("price", Numeric, nullable=False),
    Column("notional_usd", Numeric, nullable=False),
    Column("line", Text, nullable=False),
    Column("published", Boolean, nullable=False, server_default="false"),
)

# Where the alert task stopped reading `force_orders` (by `ingest_seq`).
alert_cursor = Table(
    "alert_cursor",
    metadata,
    Column("name", Text, primary_key=True),
    Column("last_ingest_seq", BigInteger, nullable=False),
)

MARKET_TABLES: Final = (agg_trades, depth_updates, mark_prices, force_orders, open_interest, depth_snapshots)
GAP_TABLES: Final = (depth_gaps, stream_gaps)
# Every table the drains fill from a Redis queue.
DRAINED_TABLES: Final = MARKET_TABLES + GAP_TABLES

# Columns a re-delivered gap record may fill in (a NULL never overwrites a value: COALESCE).
UPSERT_COLUMNS: Final = {
    "depth_gaps": ("resynced_at", "resync_update_id"),
    "stream_gaps": ("ended_at",),
}

# The hypertable partitioning column of each market-data table.
TIME_COLUMNS: Final = {
    "agg_trades": "trade_time",
    "depth_updates": "event_time",
    "mark_prices": "event_time",
    "force_orders": "transaction_time",
    "open_interest": "time",
    "depth_snapshots": "time",
    "depth_gaps": "detected_at",
    "stream_gaps": "started_at",
}

# Newest-first index on each time column, for time-range queries and exports on plain PostgreSQL.
# The name is the one TimescaleDB gives its default index (`<table>_<column>_idx`), so a hypertable
# made by an older init-db, which has that index already, is not given a second copy.
for _table in DRAINED_TABLES:
    _column = _table.c[TIME_COLUMNS[_table.name]]
    Index(f"{_table.name}_{_column.name}_idx", _column.desc())

# Columns a batch writes, in COPY order (generated columns such as `ingest_seq` left out).
COPY_COLUMNS: Final = {
    table.name: tuple(column.name for column in table.columns if column.name != "ingest_seq")
    for table in DRAINED_TABLES
}

NATURAL_KEYS: Final = {
    table.name: tuple(
        column.name
        for constraint in table.constraints
        if isinstance(constraint, UniqueConstraint)
        for column in constraint.columns
    )
    for table in DRAINED_TABLES
}
