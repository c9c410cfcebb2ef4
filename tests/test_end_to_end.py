"""The whole stack against the fake exchange: every event sent is stored once, alerts written once."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest
import redis

from collector.db.init import init_db
from collector.fake.server import FakeExchange
from collector.queue import keys
from collector.settings import Settings
from tests.processes import Process, celery_beat, celery_worker, collector_env, stream_process, wait_until

MAX_EVENTS = 4000

# How each table's rows are compared with the fake's ledger (its keys: see FakeExchange.ledger).
DB_KEYS = {
    "agg_trades": "SELECT market, symbol, aggregate_trade_id, (extract(epoch FROM trade_time) * 1000)::bigint"
    " FROM agg_trades",
    "depth_updates": "SELECT market, symbol, final_update_id, (extract(epoch FROM event_time) * 1000)::bigint"
    " FROM depth_updates",
    "mark_prices": "SELECT symbol, (extract(epoch FROM event_time) * 1000)::bigint FROM mark_prices",
    "force_orders": "SELECT symbol, side, (extract(epoch FROM transaction_time) * 1000)::bigint, price::text,"
    " quantity::text FROM force_orders",
}


def _db_keys(settings: Settings, table: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(settings.database_url)
    with conn.cursor() as cur:
        cur.execute(DB_KEYS[table])
        rows = [tuple(row) for row in cur.fetchall()]
    conn.close()
    return rows


def _ledger_keys(ledger: dict[str, Any], table: str) -> list[tuple[Any, ...]]:
    return [tuple(key) for key in ledger[table]]


@pytest.fixture
def fake() -> Iterator[FakeExchange]:
    with FakeExchange(rate=400, max_events=MAX_EVENTS, seed=7) as exchange:
        yield exchange


def _env(settings: Settings, fake: FakeExchange) -> dict[str, str]:
    return collector_env(
        settings,
        fake,
        OPEN_INTEREST_INTERVAL_S="2",
        DEPTH_SNAPSHOT_INTERVAL_S="3",
        # Generated liquidations are small (median notional ~ tens of kUSD): only the injected ones fire.
        ALERT_MIN_NOTIONAL_USD="10000000",
        ALERT_WINDOW_S="60",
        ALERT_WINDOW_NOTIONAL_USD="50000000",
        ALERT_COOLDOWN_S="300",
    )


def test_whole_stack_stores_every_event_once(settings: Settings, fake: FakeExchange, tmp_path: Path) -> None:
    """Streams -> Redis -> Celery drains -> PostgreSQL: per table, the stored keys equal the sent keys."""
    init_db(settings)
    env = _env(settings, fake)
    client = redis.Redis.from_url(settings.redis_url)
    processes: list[Process] = [
        stream_process(env, tmp_path),
        celery_worker(env, tmp_path),
        celery_beat(env, tmp_path),
    ]
    try:
        wait_until(
            lambda: (
                len(client.hgetall(keys.CONNECTIONS)) == 3
                and all(
                    orjson.loads(v)["state"] == "connected" for v in client.hgetall(keys.CONNECTIONS).values()
                )
            ),
            60,
            "three connected WebSocket connections",
        )
        # One liquidation over the single-order threshold, and a cascade on ETHUSDT whose sum crosses
        # the window threshold on its sixth order: exactly one alert each (cooldown stops the rest).
        fake.liquidation("BTCUSDT", "SELL", "65000.0", "200")
        for _ in range(7):
            fake.liquidation("ETHUSDT", "BUY", "3000.00", "3000")

        def everything_sent_is_stored() -> bool:
            ledger = fake.ledger()
            return (
                all(len(_db_keys(settings, t)) >= len(ledger[t]) for t in DB_KEYS)
                and sum(len(ledger[t]) for t in DB_KEYS) >= MAX_EVENTS
            )

        wait_until(everything_sent_is_stored, 120, "every sent event in PostgreSQL", interval_s=1)
        wait_until(
            lambda: settings.alert_log.exists() and settings.alert_log.read_text().count("\n") >= 2,
            60,
            "two alert lines",
        )
        ledger = fake.ledger()
        for table in DB_KEYS:
            stored = _db_keys(settings, table)
            sent = _ledger_keys(ledger, table)
            assert len(stored) == len(set(stored)), f"{table}: duplicates stored"
            assert sorted(stored) == sorted(sent), f"{table}: stored keys differ from sent keys"
        assert {k[0] for k in _db_keys(settings, "agg_trades")} == {"spot", "futures"}

        def rest_rows() -> tuple[list[tuple], list[tuple]]:
            conn = psycopg2.connect(settings.database_url)
            with conn.cursor() as cur:
                cur.execute("SELECT DISTINCT symbol FROM open_interest ORDER BY 1")
                open_interest = cur.fetchall()
                cur.execute("SELECT DISTINCT market_type, symbol FROM depth_snapshots ORDER BY 1, 2")
                snapshots = cur.fetchall()
            conn.close()
            return open_interest, snapshots

        # The streams can be stored before beat first sends the snapshot task (every 3 s): wait for it.
        expected = (
            [("BTCUSDT",), ("ETHUSDT",)],
            [("futures", "BTCUSDT"), ("futures", "ETHUSDT"), ("spot", "BTCUSDT"), ("spot", "ETHUSDT")],
        )
        wait_until(lambda: rest_rows() == expected, 30, "open interest and snapshots of every symbol")

        lines = settings.alert_log.read_text().splitlines()
        assert len(lines) == len(set(lines)) == 2, lines
        single = [line for line in lines if "rule=single" in line]
        window = [line for line in lines if "rule=window" in line]
        assert len(single) == 1 and " BTCUSDT SELL qty=200 price=65000 notional=13000000 USD" in single[0]
        assert len(window) == 1 and " ETHUSDT BUY qty=3000 " in window[0]
        assert "window_notional=54" in window[0]  # six injected orders of 9M, plus any small generated ones
        assert client.llen(keys.DEADLETTER) == 0
    finally:
        codes = {p.name: p.stop() for p in processes}
    assert codes["streams"] == 0, processes[0].log()[-3000:]


def test_malformed_frames_and_dropped_connections_lose_nothing(
    settings: Settings, fake: FakeExchange, tmp_path: Path
) -> None:
    """Malformed frames go to the dead-letter list; after the server drops every socket the process
    reconnects, and every well-formed event sent is stored exactly once."""
    init_db(settings)
    env = _env(settings, fake)
    client = redis.Redis.from_url(settings.redis_url)
    processes = [stream_process(env, tmp_path), celery_worker(env, tmp_path), celery_beat(env, tmp_path)]
    try:
        wait_until(lambda: client.hlen(keys.CONNECTIONS) == 3, 60, "connections")
        wait_until(lambda: sum(len(v) for k, v in fake.ledger().items() if k in DB_KEYS) > 500, 60, "traffic")
        fake.send_malformed(3)
        fake.drop_connections()
        wait_until(
            lambda: sum(int(v) for v in client.hgetall(keys.metric("reconnects")).values()) >= 3,
            60,
            "reconnects of all three connections",
        )

        def done() -> bool:
            ledger = fake.ledger()
            return sum(len(ledger[t]) for t in DB_KEYS) >= MAX_EVENTS and all(
                len(_db_keys(settings, t)) >= len(ledger[t]) for t in DB_KEYS
            )

        wait_until(done, 120, "every sent event stored", interval_s=1)
        ledger = fake.ledger()
        for table in DB_KEYS:
            stored = _db_keys(settings, table)
            assert sorted(stored) == sorted(_ledger_keys(ledger, table)), table
        letters = [orjson.loads(x) for x in client.lrange(keys.DEADLETTER, 0, -1)]
        assert len(letters) == ledger["malformed_sent"] == 3
        assert all(letter["source"] == "streams" for letter in letters)
    finally:
        processes[0].popen.send_signal(signal.SIGTERM)
        codes = {p.name: p.stop() for p in processes}
    assert codes["streams"] == 0
