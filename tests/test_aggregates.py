"""candles_1m and liquidations_1m equal what Python computes from the same stored events, on
TimescaleDB (continuous aggregates: real-time, refreshed, and after a late trade) and on plain
PostgreSQL (views)."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import psycopg2
import pytest
import redis

from collector.db.connection import connect
from collector.db.init import init_db
from collector.drain import Drainer
from collector.queue import keys
from collector.queue.envelope import make_envelope
from collector.settings import Settings

CANDLE_COLUMNS = [
    ("market", "text"),
    ("symbol", "text"),
    ("bucket", "timestamp with time zone"),
    ("open", "numeric"),
    ("high", "numeric"),
    ("low", "numeric"),
    ("close", "numeric"),
    ("volume", "numeric"),
    ("quote_volume", "numeric"),
    ("trade_count", "bigint"),
    ("agg_trade_count", "bigint"),
    ("taker_buy_volume", "numeric"),
    ("taker_buy_quote_volume", "numeric"),
]
LIQUIDATION_COLUMNS = [
    ("symbol", "text"),
    ("side", "text"),
    ("bucket", "timestamp with time zone"),
    ("count", "bigint"),
    ("quantity", "numeric"),
    ("notional", "numeric"),
]


@dataclass(frozen=True)
class Trade:
    market: str
    symbol: str
    trade_id: int  # a
    time_ms: int  # T
    price: Decimal
    quantity: Decimal
    first_id: int
    last_id: int
    buyer_is_maker: bool

    def envelope(self) -> bytes:
        data = {
            "e": "aggTrade",
            "E": self.time_ms + 3,
            "s": self.symbol,
            "a": self.trade_id,
            "p": str(self.price),
            "q": str(self.quantity),
            "f": self.first_id,
            "l": self.last_id,
            "T": self.time_ms,
            "m": self.buyer_is_maker,
        }
        frame = orjson.dumps({"stream": f"{self.symbol.lower()}@aggTrade", "data": data})
        return make_envelope(self.market, (self.time_ms + 5) * 1000, frame)


@dataclass(frozen=True)
class Liquidation:
    symbol: str
    side: str
    time_ms: int
    price: Decimal
    quantity: Decimal

    def envelope(self) -> bytes:
        order = {
            "s": self.symbol,
            "S": self.side,
            "o": "LIMIT",
            "f": "IOC",
            "q": str(self.quantity),
            "p": str(self.price),
            "ap": str(self.price),
            "X": "FILLED",
            "l": str(self.quantity),
            "z": str(self.quantity),
            "T": self.time_ms,
        }
        frame = orjson.dumps(
            {"stream": "!forceOrder@arr", "data": {"e": "forceOrder", "E": self.time_ms + 2, "o": order}}
        )
        return make_envelope("futures", (self.time_ms + 4) * 1000, frame)


def _minute(time_ms: int) -> datetime:
    return datetime.fromtimestamp(time_ms // 60_000 * 60, tz=UTC)


def expected_candles(trades: list[Trade]) -> list[tuple]:
    """The candles, computed the obvious way: group by market, symbol and UTC minute, in trade-id order."""
    groups: dict[tuple[str, str, datetime], list[Trade]] = defaultdict(list)
    for trade in trades:
        groups[(trade.market, trade.symbol, _minute(trade.time_ms))].append(trade)
    candles = []
    for (market, symbol, bucket), group in sorted(groups.items()):
        group.sort(key=lambda t: t.trade_id)
        prices = [t.price for t in group]
        takers = [t for t in group if not t.buyer_is_maker]
        candles.append(
            (
                market,
                symbol,
                bucket,
                prices[0],
                max(prices),
                min(prices),
                prices[-1],
                sum(t.quantity for t in group),
                sum(t.price * t.quantity for t in group),
                sum(t.last_id - t.first_id + 1 for t in group),
                len(group),
                sum((t.quantity for t in takers), Decimal(0)),
                sum((t.price * t.quantity for t in takers), Decimal(0)),
            )
        )
    return candles


def expected_liquidations(liquidations: list[Liquidation]) -> list[tuple]:
    groups: dict[tuple[str, str, datetime], list[Liquidation]] = defaultdict(list)
    for liquidation in liquidations:
        groups[(liquidation.symbol, liquidation.side, _minute(liquidation.time_ms))].append(liquidation)
    return [
        (
            symbol,
            side,
            bucket,
            len(group),
            sum(x.quantity for x in group),
            sum(x.price * x.quantity for x in group),
        )
        for (symbol, side, bucket), group in sorted(groups.items())
    ]


def make_trades(start_ms: int, minutes: int, seed: int = 7) -> list[Trade]:
    """Trades of two symbols on both markets; several share a millisecond, so only the id orders them."""
    rng = random.Random(seed)
    trades = []
    for market in ("spot", "futures"):
        for symbol, base in (("BTCUSDT", 65000), ("ETHUSDT", 3200)):
            trade_id, fill_id, time_ms = 1000, 50_000, start_ms
            while time_ms < start_ms + minutes * 60_000:
                fills = rng.randint(1, 4)
                trades.append(
                    Trade(
                        market,
                        symbol,
                        trade_id,
                        time_ms,
                        Decimal(base) + Decimal(rng.randint(-5000, 5000)) / 100,
                        Decimal(rng.randint(1, 50_000)) / 1000,
                        fill_id,
                        fill_id + fills - 1,
                        rng.random() < 0.5,
                    )
                )
                trade_id += 1
                fill_id += fills
                time_ms += rng.choice((0, 0, 1, 250, 1_700, 9_000))
    return trades


@pytest.fixture
def db(settings_each_mode: Settings) -> Iterator[psycopg2.extensions.connection]:
    init_db(settings_each_mode)
    conn = connect(settings_each_mode, autocommit=True)  # refresh procedures refuse a transaction
    yield conn
    conn.close()


def _store(settings: Settings, client: redis.Redis, table: str, envelopes: list[bytes]) -> None:
    """Through the real path: the Redis queue, then the drain."""
    client.rpush(keys.queue(table), *envelopes)
    result = Drainer(settings, client, lambda: connect(settings)).drain(table)
    assert result.inserted == len(envelopes) and result.dead_letters == 0


def _rows(conn: psycopg2.extensions.connection, sql: str) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def _columns(conn: psycopg2.extensions.connection, view: str) -> list[tuple]:
    return _rows(
        conn,
        "SELECT column_name, data_type FROM information_schema.columns "
        f"WHERE table_name = '{view}' ORDER BY ordinal_position",
    )


def _run_refresh_policy(conn: psycopg2.extensions.connection, view: str) -> None:
    (job_id,) = _rows(
        conn,
        "SELECT job_id FROM timescaledb_information.jobs "
        f"WHERE proc_name = 'policy_refresh_continuous_aggregate' AND hypertable_name = '{view}'",
    )[0]
    with conn.cursor() as cur:
        cur.execute("CALL run_job(%s)", (job_id,))


CANDLES_SQL = "SELECT * FROM candles_1m ORDER BY market, symbol, bucket"
LIQUIDATIONS_SQL = "SELECT * FROM liquidations_1m ORDER BY symbol, side, bucket"


def test_candles_equal_python_including_a_late_trade(
    settings_each_mode: Settings, redis_conn: redis.Redis, db: psycopg2.extensions.connection
) -> None:
    """Candles match Python: computed live, after a refresh, and after a late trade for a refreshed minute."""
    settings = settings_each_mode
    timescale = settings.timescale == "require"
    assert _columns(db, "candles_1m") == CANDLE_COLUMNS
    # Recent enough to be inside the refresh policy's window, and whole minutes before now.
    start_ms = (int(time.time()) // 60 - 10) * 60_000
    trades = make_trades(start_ms, minutes=6)
    # Held back, then stored after its minute was materialized: the opening trade of the second
    # minute of spot BTCUSDT, as when a drain is delayed or a batch recovered late.
    second_minute = _minute(start_ms + 60_000)
    late = min(
        (t for t in trades if (t.market, t.symbol, _minute(t.time_ms)) == ("spot", "BTCUSDT", second_minute)),
        key=lambda t: t.trade_id,
    )
    on_time = [t for t in trades if t is not late]
    _store(settings, redis_conn, "agg_trades", [t.envelope() for t in on_time])
    assert _rows(db, CANDLES_SQL) == expected_candles(on_time)  # nothing materialized yet: real time

    if timescale:
        with db.cursor() as cur:
            cur.execute("CALL refresh_continuous_aggregate('candles_1m', NULL, NULL)")
        assert _rows(db, CANDLES_SQL) == expected_candles(on_time)

    _store(settings, redis_conn, "agg_trades", [late.envelope()])
    if timescale:
        bucket = ("spot", "BTCUSDT", second_minute)
        stale = [c for c in _rows(db, CANDLES_SQL) if c[:3] == bucket]
        fresh = [c for c in expected_candles(trades) if c[:3] == bucket]
        assert stale != fresh  # the materialized minute does not know the late trade yet...
        _run_refresh_policy(db, "candles_1m")  # ...until the refresh policy runs
    assert _rows(db, CANDLES_SQL) == expected_candles(trades)


def test_liquidations_equal_python(
    settings_each_mode: Settings, redis_conn: redis.Redis, db: psycopg2.extensions.connection
) -> None:
    """liquidations_1m counts, sums quantity and price * quantity per symbol, side and minute."""
    settings = settings_each_mode
    assert _columns(db, "liquidations_1m") == LIQUIDATION_COLUMNS
    start_ms = (int(time.time()) // 60 - 8) * 60_000
    rng = random.Random(3)
    liquidations = [
        Liquidation(
            rng.choice(("BTCUSDT", "ETHUSDT")),
            rng.choice(("BUY", "SELL")),
            start_ms + i * 3_517,
            Decimal(rng.randint(100_000, 200_000)) / 10,
            Decimal(rng.randint(1, 9_999)) / 1000,
        )
        for i in range(120)
    ]
    _store(settings, redis_conn, "force_orders", [x.envelope() for x in liquidations])
    assert _rows(db, LIQUIDATIONS_SQL) == expected_liquidations(liquidations)
    if settings.timescale == "require":
        _run_refresh_policy(db, "liquidations_1m")
        assert _rows(db, LIQUIDATIONS_SQL) == expected_liquidations(liquidations)
        assert _rows(db, "SELECT materialized_only FROM timescaledb_information.continuous_aggregates") == [
            (False,),
            (False,),
        ]


def test_bucket_is_utc_whatever_the_session_time_zone(
    settings_each_mode: Settings, redis_conn: redis.Redis, db: psycopg2.extensions.connection
) -> None:
    """A session in a half-hour time zone sees the same UTC-minute buckets."""
    trades = make_trades((int(time.time()) // 60 - 5) * 60_000, minutes=2)
    _store(settings_each_mode, redis_conn, "agg_trades", [t.envelope() for t in trades])
    with db.cursor() as cur:
        cur.execute("SET TIME ZONE 'Asia/Kolkata'")
    assert _rows(db, CANDLES_SQL) == expected_candles(trades)
