"""Monitoring: the pure health rules, /health and /metrics served for real, `collector status/web/flower`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
import pytest
import redis
import requests
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from collector.db.connection import ensure_database
from collector.errors import ConfigError
from collector.local.servers import free_port
from collector.queue import counters, keys
from collector.queue.batches import BatchQueue
from collector.queue.connections import ConnectionRecord
from collector.queue.loop_lag import LoopLag
from collector.queue.loops import LoopSlot
from collector.settings import Settings, load_settings
from collector.web.flower import flower_command
from collector.web.health import (
    HealthSnapshot,
    StreamState,
    TableState,
    assess,
    now_us,
)
from collector.web.server import make_app
from collector.web.status import format_age

TIMEOUT_FACTOR = float(os.environ.get("TIMEOUT_FACTOR", "1"))
DEADLINE_S = 60 * TIMEOUT_FACTOR
S = 1_000_000  # µs per second
NOW = 1_800_000_000 * S


@dataclass(frozen=True)
class Limits:
    health_max_message_age_s: float = 60
    health_max_drain_age_s: float = 30
    health_max_gap_open_s: float = 120


def fresh_tables(**overrides: TableState) -> list[TableState]:
    tables = [TableState(t, 0, 0, NOW - S) for t in keys.TABLES]
    return [overrides.get(t.table, t) for t in tables]


def healthy_snapshot(**changes: object) -> HealthSnapshot:
    snap = HealthSnapshot(
        redis_up=True,
        postgres_up=True,
        connections=[ConnectionRecord("spot-0", "spot", "spot", state="connected", last_message_us=NOW - S)],
        streams=[StreamState("spot", "btcusdt@aggTrade", 10, NOW - S)],
        tables=fresh_tables(),
    )
    for name, value in changes.items():
        setattr(snap, name, value)
    return snap


# --- pure rules -------------------------------------------------------------------------------------


def test_assess_healthy() -> None:
    """A fresh connected connection, empty queues and both services up is healthy."""
    report = assess(healthy_snapshot(), NOW, Limits())
    assert report.healthy
    assert report.reasons == []
    assert report.body["healthy"] is True
    assert report.body["connections"][0]["last_message_age_s"] == 1.0
    json.dumps(report.body)  # JSON-ready


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"redis_up": False, "redis_error": "Redis is unreachable: refused"},
            "Redis is unreachable: refused",
        ),
        ({"postgres_up": False, "postgres_error": "PostgreSQL at x is unreachable"}, "PostgreSQL at x"),
        ({"connections": []}, "no connection registered"),
        (
            {"connections": [ConnectionRecord("f-1", state="backoff", last_error="timed out")]},
            "connection f-1 is backoff: timed out",
        ),
        (
            {"connections": [ConnectionRecord("f-1", state="connected", last_message_us=NOW - 61 * S)]},
            "connection f-1: last message 61s ago (max 60s)",
        ),
        (
            {"connections": [ConnectionRecord("f-1", state="connected", connected_since_us=NOW - 90 * S)]},
            "connection f-1: last message 90s ago",
        ),
        (
            {"connections": [ConnectionRecord("f-1", state="connected")]},
            "connection f-1 has received no message",
        ),
        (
            {"tables": fresh_tables(agg_trades=TableState("agg_trades", 7, 0, NOW - 31 * S))},
            "queue agg_trades: 7 waiting, last drain 31s ago (max 30s)",
        ),
        (
            {"tables": fresh_tables(mark_prices=TableState("mark_prices", 0, 3, None))},
            "queue mark_prices: 3 waiting and never drained",
        ),
    ],
)
def test_assess_unhealthy_reasons(changes: dict[str, object], expected: str) -> None:
    """Each failure condition makes the snapshot unhealthy with a one-line reason saying why."""
    report = assess(healthy_snapshot(**changes), NOW, Limits())
    assert not report.healthy
    assert len(report.reasons) == 1, report.reasons
    assert expected in report.reasons[0]
    assert "\n" not in report.reasons[0]
    assert report.body["reasons"] == report.reasons


def test_assess_redis_down_reports_only_redis() -> None:
    """With Redis down the connection and queue rules are skipped rather than reported as false leads."""
    snap = HealthSnapshot(redis_up=False, postgres_up=True, redis_error="Redis is unreachable: refused")
    report = assess(snap, NOW, Limits())
    assert report.reasons == ["Redis is unreachable: refused"]


def test_assess_tolerates_quiet_streams_and_idle_queues() -> None:
    """An old per-stream message, a connection just opened, or an old drain of an empty queue stay healthy."""
    snap = healthy_snapshot(
        connections=[
            ConnectionRecord("f-1", state="connected", last_message_us=NOW - S),
            ConnectionRecord("f-2", state="connected", connected_since_us=NOW - 5 * S),
        ],
        streams=[StreamState("futures", "!forceOrder@arr", 3, NOW - 600 * S)],
        tables=fresh_tables(open_interest=TableState("open_interest", 0, 0, NOW - 3600 * S)),
    )
    report = assess(snap, NOW, Limits())
    assert report.healthy, report.reasons
    assert report.body["streams"][0]["last_message_age_s"] == 600.0


@pytest.fixture
def no_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's `.env` out of `load_settings()` in tests that need no servers."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("no_dotenv")
def test_assess_takes_thresholds_from_settings() -> None:
    """The limits come from HEALTH_MAX_MESSAGE_AGE_S / HEALTH_MAX_DRAIN_AGE_S of the settings."""
    snap = healthy_snapshot(
        connections=[ConnectionRecord("s", state="connected", last_message_us=NOW - 20 * S)]
    )
    strict = load_settings(health_max_message_age_s=10, health_max_drain_age_s=5)
    assert assess(snap, NOW, Limits()).healthy
    assert not assess(snap, NOW, strict).healthy


def test_format_age() -> None:
    """Ages print short and readable in the status output."""
    assert [format_age(v) for v in (None, 0.44, 42.9, 725, 10920, 180000)] == [
        "never",
        "0.4s",
        "42s",
        "12m05s",
        "3h02m",
        "2d02h",
    ]


@pytest.mark.usefixtures("no_dotenv")
def test_flower_command_keeps_password_off_the_command_line() -> None:
    """Flower gets the credentials in FLOWER_BASIC_AUTH, never in argv, and none of our FLOWER_ variables."""
    settings = load_settings(flower_user="ops", flower_password="pw-123", flower_port=5999)
    environ = {"FLOWER_USER": "ops", "FLOWER_PASSWORD": "pw-123", "FLOWER_PORT": "5999", "PATH": "/bin"}
    argv, env = flower_command(settings, sys.executable, environ)
    assert argv[1:] == ["-A", "collector", "flower", "--port=5999", "--address=127.0.0.1"]  # local by default
    assert Path(argv[0]).name == "celery"
    assert not any("pw-123" in arg for arg in argv)
    assert env["FLOWER_BASIC_AUTH"] == "ops:pw-123"
    assert "FLOWER_PASSWORD" not in env and "FLOWER_USER" not in env
    assert env["PATH"] == "/bin"


def test_flower_refuses_a_public_address_with_the_default_password() -> None:
    """Flower on a non-loopback FLOWER_HOST with the shipped password is one ConfigError line."""
    public = load_settings(flower_host="0.0.0.0")
    with pytest.raises(
        ConfigError, match=r"FLOWER_PASSWORD: still the default while FLOWER_HOST is 0\.0\.0\.0"
    ):
        flower_command(public, sys.executable, {})
    argv, _ = flower_command(
        load_settings(flower_host="0.0.0.0", flower_password="s3cret"), sys.executable, {}
    )
    assert argv[-1] == "--address=0.0.0.0"


# --- served for real --------------------------------------------------------------------------------


@contextmanager
def serving(app: web.Application) -> Iterator[str]:
    """Run `app` on a free localhost port in a background event loop; yields its base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=DEADLINE_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=DEADLINE_S)
        loop.close()


def put_connection(client: redis.Redis, cid: str, state: str = "connected", age_s: float = 0.5) -> None:
    now = now_us()
    client.hset(
        keys.CONNECTIONS,
        cid,
        json.dumps(
            {
                "connection_id": cid,
                "market": "spot",
                "family": "spot",
                "url": "ws://127.0.0.1:1/stream",
                "streams": ["btcusdt@aggTrade", "btcusdt@depth@100ms"],
                "state": state,
                "connected_since_us": now - 3600 * S,
                "last_message_us": now - int(age_s * S),
                "messages": 1234,
                "reconnects": 2,
                "last_error": None if state == "connected" else "connection refused",
            }
        ),
    )


def put_stream(client: redis.Redis, market: str, stream: str, messages: int, age_s: float) -> None:
    field = keys.stream_field(market, stream)
    client.hset(keys.STREAM_MESSAGES, field, messages)
    client.hset(keys.STREAM_LAST_US, field, now_us() - int(age_s * S))


@pytest.fixture
def database(settings: Settings) -> Settings:
    """Settings whose PostgreSQL database exists (the `settings` fixture's does not yet)."""
    ensure_database(settings)
    return settings


def get(url: str) -> requests.Response:
    return requests.get(url, timeout=(5, DEADLINE_S))


def test_health_200_when_fresh(database: Settings, redis_conn: redis.Redis) -> None:
    """/health answers 200 with the JSON picture for a connected, fresh connection and empty queues."""
    put_connection(redis_conn, "spot-0")
    put_stream(redis_conn, "spot", "btcusdt@aggTrade", 42, 1)
    with serving(make_app(database)) as base:
        response = get(f"{base}/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["healthy"] is True and body["reasons"] == []
    assert body["redis"]["up"] and body["postgres"]["up"]
    assert body["connections"][0]["connection_id"] == "spot-0"
    assert body["connections"][0]["reconnects"] == 2
    assert body["streams"] == [
        {
            "market": "spot",
            "stream": "btcusdt@aggTrade",
            "messages": 42,
            "last_message_age_s": pytest.approx(1, abs=30),
        }
    ]
    assert [t["table"] for t in body["tables"]] == list(keys.TABLES)


def test_health_503_when_connection_stale(database: Settings, redis_conn: redis.Redis) -> None:
    """/health answers 503 naming the connection whose last message is too old."""
    put_connection(redis_conn, "spot-0", age_s=600)
    with serving(make_app(database)) as base:
        response = get(f"{base}/health")
    assert response.status_code == 503
    assert any("connection spot-0: last message" in r for r in response.json()["reasons"])


def test_health_503_when_queue_stuck(database: Settings, redis_conn: redis.Redis) -> None:
    """/health answers 503 when a table has queued envelopes and no recent drain."""
    put_connection(redis_conn, "spot-0")
    redis_conn.rpush(keys.queue("agg_trades"), b"{}", b"{}")
    redis_conn.hset(keys.DRAIN_LAST_SUCCESS_US, "agg_trades", now_us() - 600 * S)
    with serving(make_app(database)) as base:
        response = get(f"{base}/health")
    assert response.status_code == 503
    reasons = response.json()["reasons"]
    assert len(reasons) == 1 and reasons[0].startswith("queue agg_trades: 2 waiting, last drain 600s ago")


def test_health_503_when_postgres_unreachable(settings: Settings, redis_conn: redis.Redis) -> None:
    """/health answers 503 naming PostgreSQL when nothing listens on its port."""
    put_connection(redis_conn, "spot-0")
    broken = load_settings(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    with serving(make_app(broken)) as base:
        response = get(f"{base}/health")
    assert response.status_code == 503
    body = response.json()
    assert body["postgres"]["up"] is False
    assert len(body["reasons"]) == 1 and "PostgreSQL" in body["reasons"][0]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, keyed by name and labels (parsing it validates it)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_exports_counters_and_gauges(database: Settings, redis_conn: redis.Redis) -> None:
    """/metrics exports the Redis counters with their labels and the queue, stream, drain, service gauges."""
    counters.incr(redis_conn, "messages", "spot", "btcusdt@aggTrade", amount=5)
    counters.incr(redis_conn, "rows_inserted", "agg_trades", amount=100)
    counters.incr(redis_conn, "rest_errors", "futures", "openInterest", "read|timeout")
    put_stream(redis_conn, "spot", "btcusdt@aggTrade", 5, 10)
    put_connection(redis_conn, "spot-0")
    put_connection(redis_conn, "futures-market-0", state="backoff")
    redis_conn.rpush(keys.queue("agg_trades"), b"a", b"b", b"c")
    redis_conn.rpush(keys.queue("agg_trades", 3), b"d", b"e")  # a shard beyond QUEUE_SHARDS still counts
    redis_conn.rpush(keys.queue("depth_updates"), b"a", b"b")
    assert BatchQueue(redis_conn, "depth_updates").claim(10) is not None  # two envelopes now in flight
    redis_conn.rpush(keys.queue("depth_updates", 2), b"c")
    assert BatchQueue(redis_conn, "depth_updates", 2).claim(10) is not None
    LoopSlot(redis_conn, 2, 30_000).acquire()
    redis_conn.rpush(keys.DEADLETTER, b"x", b"y", b"z", b"w")
    redis_conn.hset(keys.DRAIN_LAST_SUCCESS_US, "agg_trades", now_us() - 5 * S)
    with serving(make_app(database)) as base:
        response = get(f"{base}/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    found = samples(response.text)

    def value(name: str, **labels: str) -> float | None:
        return found.get((name, frozenset(labels.items())))

    assert value("collector_messages_total", market="spot", stream="btcusdt@aggTrade") == 5
    assert value("collector_rows_inserted_total", table="agg_trades") == 100
    assert (
        value("collector_rest_errors_total", market="futures", endpoint="openInterest", reason="read|timeout")
        == 1
    )
    assert value("collector_queue_length", table="agg_trades") == 5  # summed over the table's shards
    assert value("collector_queue_length", table="force_orders") == 0
    assert value("collector_inflight_length", table="depth_updates") == 3
    assert value("collector_drain_loops") == 1
    assert value("collector_deadletter_length") == 4
    assert value("collector_connection_up", connection="spot-0") == 1
    assert value("collector_connection_up", connection="futures-market-0") == 0
    assert value("collector_redis_up") == 1
    assert value("collector_postgres_up") == 1
    assert value("collector_timescaledb_in_use") == 0  # the database exists, init-db has not run
    stream_age = value("collector_stream_last_message_age_seconds", market="spot", stream="btcusdt@aggTrade")
    assert stream_age is not None and 10 <= stream_age < 10 + DEADLINE_S
    drain_age = value("collector_drain_last_success_age_seconds", table="agg_trades")
    assert drain_age is not None and 5 <= drain_age < 5 + DEADLINE_S
    assert value("collector_drain_last_success_age_seconds", table="mark_prices") is None  # never drained


def test_metrics_and_health_with_redis_down(database: Settings) -> None:
    """With Redis down /metrics still answers with collector_redis_up 0, and /health answers 503."""
    broken = load_settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        database_url=database.database_url,
        redis_socket_timeout_s=2,
    )
    with serving(make_app(broken)) as base:
        metrics = get(f"{base}/metrics")
        health = get(f"{base}/health")
    assert metrics.status_code == 200
    found = samples(metrics.text)
    assert found[("collector_redis_up", frozenset())] == 0
    assert found[("collector_postgres_up", frozenset())] == 1
    assert health.status_code == 503
    assert health.json()["reasons"][0].startswith("Redis is unreachable")


# --- the CLI ----------------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector.cli", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env={**os.environ, **(env or {})},
    )


def test_status_cli_healthy(database: Settings, redis_conn: redis.Redis) -> None:
    """`collector status` prints connections, streams, queues and counters, ends with HEALTHY and exits 0."""
    put_connection(redis_conn, "spot-0")
    put_stream(redis_conn, "spot", "btcusdt@aggTrade", 42, 2)
    counters.incr(redis_conn, "rows_inserted", "agg_trades", amount=77)
    redis_conn.hset(keys.DRAIN_LAST_SUCCESS_US, "agg_trades", now_us())
    result = cli("status")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in (
        "spot-0",
        "connected",
        "btcusdt@aggTrade",
        "agg_trades",
        "rows_inserted",
        "dead letters: 0",
    ):
        assert expected in out
    assert out.strip().splitlines()[-1] == "HEALTHY"


def test_status_cli_unhealthy(database: Settings, redis_conn: redis.Redis) -> None:
    """`collector status` ends with UNHEALTHY and the reasons, and exits 1."""
    redis_conn.rpush(keys.queue("agg_trades"), b"{}")
    result = cli("status")
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("UNHEALTHY: ")
    assert "no connection registered" in last
    assert "queue agg_trades: 1 waiting and never drained" in last


def test_web_cli_starts_without_redis_and_answers_503(database: Settings, tmp_path: Path) -> None:
    """`collector web` with Redis down still serves: one warning line, and /health is 503 naming Redis."""
    port = free_port()
    log = tmp_path / "web.log"
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "REDIS_SOCKET_TIMEOUT_S": "2",
        "WEB_HOST": "127.0.0.1",
        "WEB_PORT": str(port),
    }
    with running(["web"], env, log) as process:
        response = wait_for_answer(f"http://127.0.0.1:{port}/health", process)
        assert response.status_code == 503
        assert response.json()["reasons"][0].startswith("Redis is unreachable")
    warnings = [line for line in log.read_text().splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "health.redis_unreachable" in warnings[0]


def wait_for_answer(url: str, process: subprocess.Popen[bytes], **kwargs: object) -> requests.Response:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            return requests.get(url, timeout=(1, DEADLINE_S), **kwargs)  # type: ignore[arg-type]
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"no answer from {url} within {DEADLINE_S}s")


@contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "collector.cli", *args], stdout=out, stderr=out, env={**os.environ, **env}
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=DEADLINE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def test_web_cli_serves_until_sigterm(database: Settings, redis_conn: redis.Redis, tmp_path: Path) -> None:
    """`collector web` serves /health on WEB_HOST:WEB_PORT and exits 0 on SIGTERM."""
    put_connection(redis_conn, "spot-0")
    port = free_port()
    log = tmp_path / "web.log"
    with running(["web"], {"WEB_HOST": "127.0.0.1", "WEB_PORT": str(port)}, log) as process:
        response = wait_for_answer(f"http://127.0.0.1:{port}/health", process)
        assert response.status_code == 200, response.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE_S) == 0
    assert "web.listening" in log.read_text()


def test_flower_cli_basic_auth(settings: Settings, tmp_path: Path) -> None:
    """`collector flower` serves Flower on FLOWER_PORT behind basic auth, the password not in argv or logs."""
    port = free_port()
    password = "pw-flower-test-9"
    env = {"FLOWER_PORT": str(port), "FLOWER_USER": "ops", "FLOWER_PASSWORD": password}
    log = tmp_path / "flower.log"
    with running(["flower"], env, log) as process:
        anonymous = wait_for_answer(f"http://127.0.0.1:{port}/", process)
        assert anonymous.status_code == 401
        assert get_auth(f"http://127.0.0.1:{port}/", ("ops", password)).status_code == 200
        assert get_auth(f"http://127.0.0.1:{port}/", ("ops", "wrong")).status_code == 401
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert b"flower" in cmdline and password.encode() not in cmdline
    assert password not in log.read_text()


def get_auth(url: str, auth: tuple[str, str]) -> requests.Response:
    return requests.get(url, auth=auth, timeout=(5, DEADLINE_S))


def test_the_stream_loop_lag_is_exported_and_shown(settings: Settings, redis_conn: redis.Redis) -> None:
    """The worst shard's longest event-loop block reaches /metrics and `collector status`."""
    from prometheus_client.exposition import generate_latest

    from collector.web.health import assess, snapshot
    from collector.web.metrics import make_registry
    from collector.web.status import format_status

    worst = LoopLag(87.5, 2, 100.0, 1, 2, 31.0)
    redis_conn.hset(
        keys.STREAMS_LOOP,
        mapping={
            "0/2": orjson.dumps(asdict(worst)),
            "1/2": orjson.dumps(asdict(LoopLag(12.0, 1, 100.0, 1, 2))),
        },
    )
    snap = snapshot(settings, redis_conn)
    text = generate_latest(make_registry(lambda: snap)).decode()
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["collector_stream_loop_block_max_seconds"] == pytest.approx(0.0875)
    assert samples["collector_stream_loop_blocks_over_threshold"] == 3  # over every shard
    now = time.time_ns() // 1000
    status = format_status(snap, assess(snap, now, settings), now)
    assert "event loop: longest block 88 ms (own work 31 ms), 3 over 100 ms this run" in status
