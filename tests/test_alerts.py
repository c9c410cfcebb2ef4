"""Liquidation alerts end to end on real PostgreSQL and Redis: log lines, exactly once, pub/sub, lock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psycopg2
import pytest
import redis

from collector.alerts.evaluate import evaluate_alerts
from collector.db.connection import connect
from collector.db.init import init_db
from collector.queue import keys
from collector.settings import Settings, get_settings, load_settings
from tests.conftest import TIMEOUT_FACTOR

T0_MS = int(datetime(2026, 11, 24, 12, 0, 1, 234000, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
def alert_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Small thresholds: single >= 50k, window >= 200k over 60 s, cooldown 300 s."""
    for name, value in {
        "ALERT_MIN_NOTIONAL_USD": "50000",
        "ALERT_WINDOW_S": "60",
        "ALERT_WINDOW_NOTIONAL_USD": "200000",
        "ALERT_COOLDOWN_S": "300",
        "ALERT_BATCH_MAX_ROWS": "3",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    loaded = load_settings()
    init_db(loaded)
    yield loaded
    get_settings.cache_clear()


@pytest.fixture
def conn(alert_settings: Settings) -> Iterator[psycopg2.extensions.connection]:
    connection = connect(alert_settings)
    yield connection
    connection.close()


def insert(conn: psycopg2.extensions.connection, rows: list[tuple[str, str, str, str, int]]) -> None:
    """Insert force_orders rows (symbol, side, qty, price, T ms) with plain SQL, in one commit."""
    with conn, conn.cursor() as cur:
        for symbol, side, qty, price, t_ms in rows:
            cur.execute(
                "INSERT INTO force_orders (event_time, transaction_time, symbol, side, quantity, price, "
                "received_at, payload) VALUES (to_timestamp(%s / 1000.0), to_timestamp(%s / 1000.0), "
                "%s, %s, %s, %s, now(), '{}')",
                (t_ms, t_ms, symbol, side, qty, price),
            )


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def line(
    symbol: str, side: str, qty: str, price: str, notional: str, t_ms: int, rule: str, extra: str = ""
) -> str:
    moment = datetime.fromtimestamp(t_ms / 1000, tz=UTC)
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    condition = "single(>=50000)" if rule == "single" else "window(>=200000 in 60s)"
    key = f"{rule}|{symbol}|{side}|{t_ms}|{price}|{qty}"
    return (
        f"{stamp} LIQUIDATION {symbol} {side} qty={qty} price={price} notional={notional} USD "
        f"rule={condition}{extra} key={key}"
    )


def test_evaluate_writes_exact_lines(
    alert_settings: Settings, conn: psycopg2.extensions.connection, redis_conn: redis.Redis
) -> None:
    """New force_orders rows become exactly the expected alert lines, in order, across batches."""
    insert(
        conn,
        [
            ("BTCUSDT", "SELL", "1.5", "65000.1", T0_MS),  # 97500.15 -> single
            ("ETHUSDT", "BUY", "1", "3000", T0_MS + 1),  # small
            ("BTCUSDT", "SELL", "0.5", "65000", T0_MS + 2000),  # 32500, window 130000.15
            ("BTCUSDT", "BUY", "1", "45000", T0_MS + 3000),  # window 175000.15
            ("BTCUSDT", "BUY", "0.5", "60000", T0_MS + 4000),  # 30000 -> window 205000.15
        ],
    )
    summary = evaluate_alerts(alert_settings, conn, redis_conn)
    assert (summary.rows, summary.alerts, summary.written, summary.published) == (5, 2, 2, 2)
    assert log_lines(alert_settings.alert_log) == [
        line("BTCUSDT", "SELL", "1.5", "65000.1", "97500.15", T0_MS, "single"),
        line(
            "BTCUSDT",
            "BUY",
            "0.5",
            "60000",
            "30000",
            T0_MS + 4000,
            "window",
            " window_notional=205000.15 USD",
        ),
    ]
    with conn, conn.cursor() as cur:
        cur.execute("SELECT rule, published FROM alerts ORDER BY alert_id")
        assert cur.fetchall() == [("single", True), ("window", True)]
        cur.execute("SELECT last_ingest_seq FROM alert_cursor")
        assert cur.fetchone() == (5,)
    assert redis_conn.hgetall(keys.metric("alerts")) == {b"single": b"1", b"window": b"1"}


def test_rerun_and_crash_between_write_and_update_write_nothing_twice(
    alert_settings: Settings, conn: psycopg2.extensions.connection, redis_conn: redis.Redis
) -> None:
    """A second run, and a retry after a crash between the file write and the DB update, add no line."""
    insert(conn, [("BTCUSDT", "SELL", "2", "50000", T0_MS), ("SOLUSDT", "SELL", "1000", "150", T0_MS + 1)])
    evaluate_alerts(alert_settings, conn, redis_conn)
    first = log_lines(alert_settings.alert_log)
    assert len(first) == 2
    assert evaluate_alerts(alert_settings, conn, redis_conn).written == 0
    # The crash: lines on disk, but the database still says "not published".
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE alerts SET published = false")
    retry = evaluate_alerts(alert_settings, conn, redis_conn)
    assert (retry.written, retry.published) == (0, 2)
    # A crash before the cursor moved: the same rows are decided again, under the same keys.
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE alert_cursor SET last_ingest_seq = 0")
        cur.execute("UPDATE alerts SET published = false")
    replay = evaluate_alerts(alert_settings, conn, redis_conn)
    assert (replay.rows, replay.alerts, replay.written) == (2, 0, 0)
    assert log_lines(alert_settings.alert_log) == first


def test_line_written_after_a_torn_last_line(
    alert_settings: Settings, conn: psycopg2.extensions.connection, redis_conn: redis.Redis
) -> None:
    """A log whose last line was cut off by a crash still gets each new alert on a line of its own."""
    alert_settings.alert_log.write_text("older line\npartial li")
    insert(conn, [("BTCUSDT", "SELL", "2", "50000", T0_MS)])
    evaluate_alerts(alert_settings, conn, redis_conn)
    assert log_lines(alert_settings.alert_log) == [
        "older line",
        "partial li",
        line("BTCUSDT", "SELL", "2", "50000", "100000", T0_MS, "single"),
    ]


def test_alerts_are_published_on_the_channel(
    alert_settings: Settings, conn: psycopg2.extensions.connection, redis_conn: redis.Redis
) -> None:
    """Each alert is published as JSON on collector:alerts to subscribers listening beforehand."""
    pubsub = redis_conn.pubsub()
    pubsub.subscribe(keys.ALERTS_CHANNEL)
    assert pubsub.get_message(timeout=5 * TIMEOUT_FACTOR)["type"] == "subscribe"  # type: ignore[index]
    insert(conn, [("BTCUSDT", "SELL", "1.5", "65000.1", T0_MS)])
    evaluate_alerts(alert_settings, conn, redis_conn)
    deadline = time.monotonic() + 10 * TIMEOUT_FACTOR
    message = None
    while message is None and time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
    pubsub.close()
    assert message is not None
    body = orjson.loads(message["data"])
    assert body["alert_key"] == f"single|BTCUSDT|SELL|{T0_MS}|65000.1|1.5"
    assert body["rule"] == "single" and body["notional_usd"] == "97500.15"
    assert body["liquidation_time"] == "2026-11-24T12:00:01.234000Z"
    assert body["line"] == log_lines(alert_settings.alert_log)[0]


def test_cooldown_across_runs(
    alert_settings: Settings, conn: psycopg2.extensions.connection, redis_conn: redis.Redis
) -> None:
    """The cooldown reads the last alert time from the alerts table, so it holds across runs."""
    insert(conn, [("BTCUSDT", "SELL", "2", "50000", T0_MS)])
    evaluate_alerts(alert_settings, conn, redis_conn)
    insert(conn, [("BTCUSDT", "SELL", "3", "50000", T0_MS + 30_000)])  # single silenced; window 250k
    insert(conn, [("BTCUSDT", "SELL", "4", "50000", T0_MS + 300_000)])  # single cooldown over
    evaluate_alerts(alert_settings, conn, redis_conn)
    rules = [entry.split(" key=")[1].split("|")[0] for entry in log_lines(alert_settings.alert_log)]
    keys_t = [int(entry.split("|")[3]) for entry in log_lines(alert_settings.alert_log)]
    assert list(zip(rules, keys_t, strict=True)) == [
        ("single", T0_MS),
        ("window", T0_MS + 30_000),
        ("single", T0_MS + 300_000),
    ]


def test_task_lock_busy_and_release(alert_settings: Settings, redis_conn: redis.Redis) -> None:
    """The task does nothing while another holds the lock, and releases only its own lock."""
    from collector.tasks.alerts import evaluate

    redis_conn.set(keys.ALERTS_LOCK, "someone-else", px=60_000)
    assert evaluate() is None
    assert redis_conn.get(keys.ALERTS_LOCK) == b"someone-else"
    redis_conn.delete(keys.ALERTS_LOCK)
    assert evaluate() == {"rows": 0, "alerts": 0, "written": 0, "published": 0}
    assert redis_conn.get(keys.ALERTS_LOCK) is None


def test_postgres_down_is_one_warning_then_one_line_when_back(
    alert_settings: Settings,
    conn: psycopg2.extensions.connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While PostgreSQL is unreachable the alert task (run every second) logs one warning, not a
    traceback a second, and one line when it is back; it decides nothing meanwhile."""
    from collector.local.servers import free_port
    from collector.tasks import alerts

    good = alert_settings.database_url
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/collector")
    get_settings.cache_clear()
    with caplog.at_level("INFO"):
        assert [alerts.evaluate() for _ in range(5)] == [None] * 5
        monkeypatch.setenv("DATABASE_URL", good)
        get_settings.cache_clear()
        assert alerts.evaluate() == {"rows": 0, "alerts": 0, "written": 0, "published": 0}
        assert alerts.evaluate() is not None
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("collector.tasks.alerts")]
    assert [line.split(" ")[0] for line in lines] == ["alerts.postgres_unreachable", "alerts.postgres_back"]
    assert "Traceback" not in caplog.text
