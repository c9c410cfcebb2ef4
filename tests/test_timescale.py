"""TimescaleDB exactly when it can be used, and settings as the truth: `collector init-db` against a
preloaded server, a server with the extension installed but not preloaded, and TIMESCALE=off."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import psycopg2
import pytest

from collector.db import timescale
from collector.db.aggregates import CANDLES_1M
from collector.db.init import init_db
from collector.db.timescale import (
    AggregateState,
    HypertableState,
    RefreshPolicy,
    ServerSupport,
    decide,
    hypertable_policy,
    plan_aggregate,
    plan_hypertable,
    refresh_policy,
)
from collector.errors import ConfigError
from collector.settings import Settings, load_settings
from tests.conftest import plain_postgres, requires_timescaledb

COLLECTOR = str(Path(sys.executable).with_name("collector"))
MARKET_TABLES = list(timescale.SEGMENT_BY)


def _init_db(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COLLECTOR, "init-db"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def _query(url: str, sql: str) -> list[tuple]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


# --- pure: when to use it ---------------------------------------------------------------------------

INSTALLED = ServerSupport(installed="2.28.3", created=None, preloaded=False)
PRELOADED = ServerSupport(installed="2.28.3", created=None, preloaded=True)
CREATED = ServerSupport(installed="2.28.3", created="2.28.3", preloaded=True)
ABSENT = ServerSupport(installed=None, created=None, preloaded=False)


@pytest.mark.parametrize(
    ("support", "mode", "use", "warning"),
    [
        (PRELOADED, "auto", True, None),
        (CREATED, "auto", True, None),
        (PRELOADED, "require", True, None),
        (INSTALLED, "auto", False, "installed but not preloaded"),
        (ABSENT, "auto", False, "not installed"),
        (PRELOADED, "off", False, None),
        (ABSENT, "off", False, None),
        (CREATED, "off", False, "already uses TimescaleDB"),
    ],
)
def test_decide_uses_timescaledb_exactly_when_it_can(
    support: ServerSupport, mode: str, use: bool, warning: str | None
) -> None:
    """Hypertables when the server preloads the extension; otherwise plain tables and a warning naming why."""
    decision = decide(support, mode)
    assert decision.use is use
    if warning is None:
        assert decision.warning is None
    else:
        assert decision.warning is not None and warning in decision.warning and "\n" not in decision.warning
    if not use and support is INSTALLED:
        assert "shared_preload_libraries = 'timescaledb'" in str(decision.warning)


@pytest.mark.parametrize("support", [INSTALLED, ABSENT])
def test_require_refuses_with_one_line(support: ServerSupport) -> None:
    """TIMESCALE=require where the extension cannot be used is a ConfigError naming the fix."""
    with pytest.raises(ConfigError) as error:
        decide(support, "require")
    assert str(error.value).startswith("TIMESCALE=require: ") and "\n" not in str(error.value)


@pytest.mark.parametrize("mode", ["auto", "require", "off"])
def test_created_but_not_preloaded_is_refused_in_every_mode(mode: str) -> None:
    """An extension created in the database but not preloaded would let inserts bypass the chunks."""
    broken = ServerSupport(installed="2.28.3", created="2.28.3", preloaded=False)
    with pytest.raises(ConfigError, match="shared_preload_libraries = 'timescaledb'"):
        decide(broken, mode)


# --- pure: plans ------------------------------------------------------------------------------------


def _state_matching(table: str, settings: Settings) -> HypertableState:
    policy = hypertable_policy(settings)
    return HypertableState(
        chunk_interval=policy.chunk_interval,
        compression_enabled=True,
        segment_by=timescale.SEGMENT_BY[table],
        order_by=timescale.order_by(table),
        compress_after=policy.compress_after,
        retention=policy.retention,
    )


def test_plan_for_a_new_table_creates_hypertable_compression_and_policies() -> None:
    """A plain table becomes a hypertable on its time column, compressed by symbol, with retention."""
    settings = load_settings(timescale_retention_days=90)
    changes = plan_hypertable("agg_trades", None, hypertable_policy(settings))
    statements = [c.statement for c in changes]
    assert statements[0].startswith("SELECT create_hypertable('agg_trades', 'trade_time'")
    assert "migrate_data => TRUE" in statements[0]
    assert "compress_segmentby = 'market, symbol'" in statements[1]
    assert "compress_orderby = 'trade_time DESC, aggregate_trade_id'" in statements[1]
    assert statements[2] == "SELECT add_compression_policy('agg_trades', INTERVAL '604800 seconds')"
    assert statements[3] == "SELECT add_retention_policy('agg_trades', INTERVAL '7776000 seconds')"
    assert [c.line for c in changes][-1] == "agg_trades: drop chunks older than 90 days"
    assert timescale.order_by("force_orders") == "transaction_time DESC, side, price, quantity"


def test_plan_is_empty_when_the_catalog_matches() -> None:
    """Nothing to do, nothing executed, nothing printed."""
    settings = load_settings(timescale_retention_days=30)
    for table in MARKET_TABLES:
        assert plan_hypertable(table, _state_matching(table, settings), hypertable_policy(settings)) == []
    current = AggregateState("continuous", materialized_only=False, refresh=refresh_policy(settings))
    assert plan_aggregate(CANDLES_1M, current, refresh_policy(settings)) == []


def test_plan_changes_each_setting_with_one_line() -> None:
    """Chunk interval, compression after N days and retention changes each give one line."""
    before = load_settings(timescale_retention_days=30)
    after = load_settings(
        timescale_chunk_interval_h=6, timescale_compress_after_days=3, timescale_retention_days=60
    )
    changes = plan_hypertable("mark_prices", _state_matching("mark_prices", before), hypertable_policy(after))
    assert [c.line for c in changes if c.line] == [
        "mark_prices: chunk interval 1 day -> 6 h (for chunks created from now on)",
        "mark_prices: compress chunks older than 3 days (was 7 days)",
        "mark_prices: drop chunks older than 60 days (was 30 days)",
    ]
    assert [c.statement.split("(")[0] for c in changes] == [
        "SELECT set_chunk_time_interval",
        "SELECT remove_compression_policy",
        "SELECT add_compression_policy",
        "SELECT remove_retention_policy",
        "SELECT add_retention_policy",
    ]
    off = load_settings(timescale_compress_after_days=0, timescale_retention_days=0)
    removed = plan_hypertable("mark_prices", _state_matching("mark_prices", before), hypertable_policy(off))
    assert [c.line for c in removed] == [
        "mark_prices: compression policy removed (compressed chunks stay so)",
        "mark_prices: retention policy removed (rows are kept forever)",
    ]


def test_plan_replaces_a_plain_view_with_a_continuous_aggregate() -> None:
    """A database that was plain gets its view replaced by the real aggregate and its policy."""
    policy = RefreshPolicy(timedelta(hours=24), timedelta(minutes=1), timedelta(seconds=60))
    changes = plan_aggregate(CANDLES_1M, AggregateState("view"), policy)
    assert changes[0].statement == "DROP VIEW candles_1m"
    assert "WITH (timescaledb.continuous, timescaledb.materialized_only = false)" in changes[1].statement
    assert changes[1].statement.endswith("WITH NO DATA")
    assert changes[2].line == "candles_1m: refreshed every 1 min over the last 1 day"


def test_lookback_must_be_shorter_than_retention() -> None:
    """A refresh window reaching past retention would empty aggregate buckets: refused at start."""
    with pytest.raises(ConfigError, match="TIMESCALE_AGGREGATE_LOOKBACK_H"):
        load_settings(timescale_retention_days=1, timescale_aggregate_lookback_h=24)


# --- against real servers ---------------------------------------------------------------------------


def _jobs(url: str) -> dict[tuple[str, str], tuple]:
    rows = _query(
        url,
        "SELECT hypertable_name, proc_name, schedule_interval, config FROM timescaledb_information.jobs "
        "WHERE hypertable_schema = 'public'",
    )
    return {(name, proc): (schedule, config) for name, proc, schedule, config in rows}


def _interval(url: str, text: str) -> timedelta:
    return _query(url, f"SELECT INTERVAL '{text}'")[0][0]


@requires_timescaledb
def test_init_db_follows_every_setting(settings: Settings, tmp_path: Path) -> None:
    """Each TIMESCALE_* change reaches timescaledb_information.jobs and dimensions; a rerun prints nothing."""
    url = settings.database_url
    first = _init_db(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "extension timescaledb 2.28.3 created" in first.stdout
    assert "candles_1m: continuous aggregate of agg_trades" in first.stdout
    assert first.stderr == ""
    hypertables = _query(
        url, "SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables"
    )
    assert sorted(hypertables) == sorted((t, True) for t in MARKET_TABLES)

    again = _init_db(tmp_path)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")

    changed = {
        "TIMESCALE_CHUNK_INTERVAL_H": "6",
        "TIMESCALE_COMPRESS_AFTER_DAYS": "3",
        "TIMESCALE_RETENTION_DAYS": "30",
        "TIMESCALE_AGGREGATE_REFRESH_INTERVAL_S": "120",
        "TIMESCALE_AGGREGATE_LOOKBACK_H": "12",
    }
    second = _init_db(tmp_path, **changed)
    assert second.returncode == 0, second.stderr
    lines = second.stdout.splitlines()
    assert len(lines) == 3 * len(MARKET_TABLES) + 2, lines
    assert "agg_trades: chunk interval 1 day -> 6 h (for chunks created from now on)" in lines
    dimensions = _query(
        url,
        "SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions "
        "WHERE hypertable_schema = 'public'",
    )
    assert sorted(dimensions) == sorted((t, timedelta(hours=6)) for t in MARKET_TABLES)
    jobs = _jobs(url)
    for table in MARKET_TABLES:
        compress = jobs[(table, "policy_compression")][1]["compress_after"]
        assert _interval(url, compress) == timedelta(days=3)
        drop = jobs[(table, "policy_retention")][1]["drop_after"]
        assert _interval(url, drop) == timedelta(days=30)
    for view in ("candles_1m", "liquidations_1m"):
        schedule, config = jobs[(view, "policy_refresh_continuous_aggregate")]
        assert schedule == timedelta(seconds=120)
        assert _interval(url, config["start_offset"]) == timedelta(hours=12)

    third = _init_db(tmp_path, **changed)
    assert (third.returncode, third.stdout, third.stderr) == (0, "", "")

    # 0 removes the policies; the tables stay compressed hypertables.
    removed = _init_db(tmp_path, TIMESCALE_COMPRESS_AFTER_DAYS="0", TIMESCALE_RETENTION_DAYS="0")
    assert removed.returncode == 0, removed.stderr
    assert "agg_trades: retention policy removed (rows are kept forever)" in removed.stdout
    procs = {proc for _, proc in _jobs(url)}
    assert procs == {"policy_refresh_continuous_aggregate"}


@requires_timescaledb
def test_installed_but_not_preloaded_gives_plain_tables_and_one_warning(
    unpreloaded_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Right after installing the package: init-db warns once and makes plain tables; require exits 2."""
    env = {"DATABASE_URL": unpreloaded_database_url, "REDIS_URL": redis_url}
    done = _init_db(tmp_path, **env)
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.splitlines()
    assert len(warnings) == 1 and "WARNING" in warnings[0], done.stderr
    assert "installed but not preloaded" in warnings[0]
    assert "shared_preload_libraries = 'timescaledb'" in warnings[0]
    assert "table agg_trades created" in done.stdout
    assert "candles_1m: view of agg_trades (computed at query time)" in done.stdout
    assert _query(
        unpreloaded_database_url, "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
    ) == [(0,)]

    required = _init_db(tmp_path, TIMESCALE="require", **env)
    assert required.returncode == 2
    assert required.stderr.count("\n") == 1 and "Traceback" not in required.stderr
    assert required.stderr.startswith(
        "collector: TIMESCALE=require: timescaledb 2.28.3 is installed but not preloaded"
    )


@requires_timescaledb
def test_off_keeps_plain_tables_and_auto_converts_them_later(settings: Settings, tmp_path: Path) -> None:
    """TIMESCALE=off gives plain tables on a preloaded server; switching to auto converts them, rows kept."""
    off = _init_db(tmp_path, TIMESCALE="off")
    assert off.returncode == 0 and off.stderr == "", off.stderr
    url = settings.database_url
    assert _query(url, "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'") == [(0,)]
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO agg_trades (event_time, market, symbol, aggregate_trade_id, trade_time, price, "
            "quantity, first_trade_id, last_trade_id, is_buyer_maker, received_at, payload) "
            "SELECT now(), 'spot', 'BTCUSDT', i, now() - i * INTERVAL '1 minute', 100 + i, 1, i, i, "
            "i % 2 = 0, now(), '{}' FROM generate_series(1, 50) AS i"
        )
    conn.close()
    plain_candles = _query(url, "SELECT * FROM candles_1m ORDER BY bucket")

    converted = _init_db(tmp_path)
    assert converted.returncode == 0, converted.stderr
    assert "agg_trades: hypertable on trade_time, chunks of 1 day" in converted.stdout
    assert "candles_1m: continuous aggregate of agg_trades (replaces the plain view)" in converted.stdout
    assert _query(url, "SELECT count(*) FROM agg_trades") == [(50,)]
    assert _query(url, "SELECT count(*) FROM ONLY agg_trades") == [(0,)]  # every row moved into chunks
    assert _query(url, "SELECT * FROM candles_1m ORDER BY bucket") == plain_candles


@requires_timescaledb
def test_health_and_status_name_the_database_mode(settings: Settings) -> None:
    """/health and `collector status` say whether the data is in hypertables or plain tables."""
    from collector.web.health import HealthSnapshot, check_postgres, now_us
    from collector.web.metrics import families

    init_db(settings)
    error, database, _ = check_postgres(settings)
    assert error is None and database is not None
    assert database["mode"] == "timescaledb" and database["ok"] is True
    assert database["detail"] == "TimescaleDB 2.28.3: 8 hypertables, 2 continuous aggregates"
    status = subprocess.run([COLLECTOR, "status"], capture_output=True, text=True, timeout=60)
    assert "database    TimescaleDB 2.28.3: 8 hypertables, 2 continuous aggregates" in status.stdout
    snap = HealthSnapshot(redis_up=False, postgres_up=True, database=database)
    gauges = {m.name: m.samples[0].value for m in families(snap, now_us())}
    assert gauges["collector_timescaledb_in_use"] == 1


@plain_postgres
def test_plain_mode_is_reported(settings: Settings) -> None:
    """With TIMESCALE=off, /health reports plain tables and stays healthy."""
    from collector.web.health import check_postgres

    init_db(settings.model_copy(update={"timescale": "off"}))
    error, database, _ = check_postgres(settings)
    assert error is None and database is not None
    assert database["mode"] == "plain" and database["ok"] is True
    assert str(database["detail"]).startswith("plain PostgreSQL tables")


@requires_timescaledb
def test_compressed_chunks_take_replays_and_late_rows(settings: Settings, redis_conn) -> None:
    """After the compression policy ran, a replayed batch adds nothing and a late row still lands once."""
    from collector.db.connection import connect
    from collector.drain import Drainer
    from collector.queue import keys
    from tests.factories import BASE_MS, agg_trade

    assert init_db(settings).timescale
    client = redis_conn
    # factories' trades are from 2025-11-24: far older than TIMESCALE_COMPRESS_AFTER_DAYS.
    batch = [agg_trade(i) for i in range(0, 2000, 2)]
    drainer = Drainer(settings, client, lambda: connect(settings))
    client.rpush(keys.queue("agg_trades"), *batch)
    assert drainer.drain("agg_trades").inserted == len(batch)
    conn = connect(settings, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT job_id FROM timescaledb_information.jobs "
            "WHERE proc_name = 'policy_compression' AND hypertable_name = 'agg_trades'"
        )
        cur.execute("CALL run_job(%s)", (cur.fetchone()[0],))
        cur.execute(
            "SELECT count(*), bool_and(is_compressed) FROM timescaledb_information.chunks "
            "WHERE hypertable_name = 'agg_trades'"
        )
        assert cur.fetchone() == (1, True)
        cur.execute("SELECT compression_ratio FROM storage_usage WHERE table_name = 'agg_trades'")
        assert cur.fetchone()[0] > 1

    late = agg_trade(1)  # same day, same chunk, never stored
    client.rpush(keys.queue("agg_trades"), *batch[:100], late)
    result = drainer.drain("agg_trades")
    assert (result.inserted, result.duplicates) == (1, 100)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT aggregate_trade_id) FROM agg_trades")
        assert cur.fetchone() == (len(batch) + 1, len(batch) + 1)
        cur.execute("SELECT min(trade_time) = to_timestamp(%s / 1000.0) FROM agg_trades", (BASE_MS - 1,))
        assert cur.fetchone()[0] is True
    conn.close()
