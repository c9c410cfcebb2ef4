"""`ingest_ranges` keeps what its tables keep: TimescaleDB's retention drops a table's old chunks and
a job drops that table's ranges at the same horizon; plain tables keep both. `collector audit` says
when the period asked reaches back past retention."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import redis

from collector.audit import Horizon, RunBalance, format_audit, format_horizon, horizon, read_horizon, verdict
from collector.db import timescale
from collector.db.init import init_db
from collector.db.timescale import PRUNE_BODY, PruneJobState, plan_prune_job
from collector.queue import keys
from collector.settings import Settings
from tests.conftest import requires_timescaledb

COLLECTOR = str(Path(sys.executable).with_name("collector"))
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
JOB_LINE = (
    "ingest_ranges: every 1 h, ranges older than their table's retention are dropped (prune_ingest_ranges)"
)


# --- pure ---------------------------------------------------------------------------------------------


def test_prune_job_plan_creates_once_and_then_nothing() -> None:
    """A database without the job gets the procedure and an hourly job; one that has both gets nothing."""
    missing = plan_prune_job(PruneJobState(body=None, scheduled=False))
    assert missing[0].statement.startswith("CREATE OR REPLACE PROCEDURE prune_ingest_ranges(")
    assert missing[1].statement == "SELECT add_job('prune_ingest_ranges', INTERVAL '3600 seconds')"
    assert [c.line for c in missing if c.line] == [JOB_LINE]
    assert plan_prune_job(PruneJobState(body=PRUNE_BODY, scheduled=True)) == []
    changed = plan_prune_job(PruneJobState(body="DELETE FROM ingest_ranges", scheduled=True))
    assert [c.line for c in changed] == ["ingest_ranges: prune procedure updated"]


def test_horizon_only_when_the_period_reaches_past_a_tables_retention() -> None:
    """The shortest retention of the audited tables sets the horizon; a period inside it has none."""
    retention = {"agg_trades": 30 * DAY, "mark_prices": 7 * DAY, "open_interest": 1 * DAY}
    tables = ["agg_trades", "mark_prices"]  # open_interest is not audited: its retention does not count
    assert horizon(retention, tables, NOW - 6 * DAY, NOW) is None
    assert horizon({}, tables, NOW - 400 * DAY, NOW) is None  # plain tables keep everything
    found = horizon(retention, tables, NOW - 40 * DAY, NOW)
    assert found is not None and found.start == NOW - 7 * DAY
    assert format_horizon(found) == (
        "retention: rows older than 7 days (mark_prices), 30 days (agg_trades) are dropped with their "
        "ranges, so nothing received before 2026-11-30T12:00:00+00:00 can be accounted for "
        "(asked from 2026-10-28T12:00:00+00:00)"
    )
    assert (
        format_audit([], [], {}, {}, found)
        == f"{format_horizon(found)}\nno audited events drained in this period"
    )
    same = horizon({"agg_trades": 30 * DAY}, tables, NOW - 40 * DAY, NOW)
    assert same is not None and format_horizon(same).startswith("retention: rows older than 30 days are")


def _balance(lowest: int, earlier: bool, started: datetime, drained: int = 100) -> RunBalance:
    return RunBalance(
        "agg_trades", "r1", lowest + drained - 1, drained, drained, 0, 0, 0, started, lowest, earlier
    )


def test_a_run_older_than_the_period_is_counted_from_its_first_number_in_it() -> None:
    """Numbers below the period were drained before it (kept ranges) or pruned at the horizon: the run
    balances from its lowest number; without either, they were lost before its first drain."""
    recent = NOW - timedelta(hours=1)
    assert verdict(_balance(1, False, recent), 100, 0, 0, None) == "balanced"
    assert verdict(_balance(201, True, recent), 300, 0, 0, None) == "balanced from 201"
    assert verdict(_balance(201, False, recent), 300, 0, 0, None) == "200 not accounted for yet"
    found = Horizon(NOW, NOW - 40 * DAY, {"agg_trades": 30 * DAY})
    at_horizon = NOW - 30 * DAY + timedelta(minutes=30)
    assert verdict(_balance(201, False, at_horizon), 300, 0, 0, found) == "balanced from 201"
    assert verdict(_balance(201, False, recent), 300, 0, 0, found) == "200 not accounted for yet"


# --- against real servers -----------------------------------------------------------------------------


def _execute(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _add_range(url: str, table: str, first: int, last: int, received: datetime) -> None:
    _execute(
        url,
        "INSERT INTO ingest_ranges (table_name, run, first_seq, last_seq, first_received_at, "
        "last_received_at, rows_inserted) VALUES (%s, 'r1', %s, %s, %s, %s, %s)",
        (table, first, last, received, received, last - first + 1),
    )


def _add_trade(url: str, trade_id: int, at: datetime) -> None:
    _execute(
        url,
        "INSERT INTO agg_trades (event_time, market, symbol, aggregate_trade_id, trade_time, price, "
        "quantity, received_at, payload) VALUES (%s, 'spot', 'BTCUSDT', %s, %s, 1, 1, %s, '{}')",
        (at, trade_id, at, at),
    )


def _run_jobs(url: str, proc: str) -> None:
    for (job_id,) in _execute(
        url, "SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = %s", (proc,)
    ):
        _execute(url, "CALL run_job(%s)", (job_id,))


def _audit(*args: str) -> list[str]:
    done = subprocess.run([COLLECTOR, "audit", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _record_history(url: str, client: redis.Redis, now: datetime) -> None:
    """One run of agg_trades: numbers 1..100 received 32 days ago, 101..200 at the 30-day horizon
    (just inside it), 201..300 an hour ago, each with its row."""
    for first, received in (
        (1, now - 32 * DAY),
        (101, now - 30 * DAY + timedelta(minutes=30)),
        (201, now - timedelta(hours=1)),
    ):
        _add_range(url, "agg_trades", first, first + 99, received)
        _add_trade(url, first, received)
    client.hset(keys.AUDIT_QUEUED, "r1/agg_trades", 300)


def test_timescaledb_ranges_go_with_their_tables_rows_and_audit_says_so(
    settings_each_mode: Settings, redis_conn: redis.Redis
) -> None:
    """With TimescaleDB, the ranges of a table go at its own retention horizon, with its chunks, and the
    audit of a longer period starts with one line saying from when it can vouch; plain tables keep
    every row and every range, and their audit has no such line."""
    settings = settings_each_mode
    url = settings.database_url
    with_timescale = init_db(settings.model_copy(update={"timescale_retention_days": 30})).timescale
    assert with_timescale is (settings.timescale == "require")
    now = datetime.now(UTC)
    _record_history(url, redis_conn, now)
    for first, age in (
        (1, 8 * DAY),
        (2, 7 * DAY - timedelta(minutes=30)),
    ):  # mark_prices, given a 7-day retention below
        _add_range(url, "mark_prices", first, first, now - age)
    redis_conn.hset(keys.AUDIT_QUEUED, "r1/mark_prices", 2)
    if with_timescale:
        _execute(url, "SELECT remove_retention_policy('mark_prices')")
        _execute(url, "SELECT add_retention_policy('mark_prices', INTERVAL '7 days')")
        _run_jobs(url, "policy_retention")
        _run_jobs(url, "prune_ingest_ranges")
    kept = _execute(url, "SELECT table_name, first_seq FROM ingest_ranges ORDER BY 1, 2")
    trades = _execute(url, "SELECT aggregate_trade_id FROM agg_trades ORDER BY 1")
    if with_timescale:  # agg_trades at 30 days, mark_prices at 7: rows and ranges alike
        assert kept == [("agg_trades", 101), ("agg_trades", 201), ("mark_prices", 2)]
        assert trades == [(101,), (201,)]
    else:
        assert kept == [
            ("agg_trades", 1),
            ("agg_trades", 101),
            ("agg_trades", 201),
            ("mark_prices", 1),
            ("mark_prices", 2),
        ]
        assert trades == [(1,), (101,), (201,)]

    since = (now - 40 * DAY).strftime("%Y-%m-%dT%H:%M:%S")
    lines = _audit("--since", since)
    rows = {line.split()[0]: line for line in lines if line.startswith(("agg_trades ", "mark_prices "))}
    if with_timescale:
        assert lines[0].startswith(
            "retention: rows older than 7 days (mark_prices), 30 days (agg_trades) are dropped with their "
            "ranges, so nothing received before "
        ), lines
        assert lines[0].endswith(f"can be accounted for (asked from {since}+00:00)")
        assert rows["agg_trades"].endswith("balanced from 101") and rows["mark_prices"].endswith(
            "balanced from 2"
        )
    else:
        assert lines[0].startswith("TABLE "), lines
        assert rows["agg_trades"].endswith("balanced") and rows["mark_prices"].endswith("balanced")
    # The last 24 hours: inside every horizon, and the run is counted from its first number in them.
    recent = _audit()
    assert recent[0].startswith("TABLE ") and recent[1].endswith("balanced from 201"), recent


@requires_timescaledb
def test_timescale_off_keeps_pruning_the_hypertables_ranges(settings: Settings) -> None:
    """TIMESCALE=off on a database with hypertables: their retention policies still drop chunks, so
    init-db keeps the prune job that goes with them."""
    url = settings.database_url
    assert init_db(settings.model_copy(update={"timescale_retention_days": 30})).timescale
    _execute(
        url,
        "SELECT delete_job(job_id) FROM timescaledb_information.jobs WHERE proc_name = 'prune_ingest_ranges'",
    )
    off = init_db(settings.model_copy(update={"timescale": "off"}))
    assert not off.timescale
    assert JOB_LINE in off.changes
    now = datetime.now(UTC)
    _add_range(url, "agg_trades", 1, 100, now - 31 * DAY)
    _add_range(url, "agg_trades", 101, 200, now - 29 * DAY)
    _run_jobs(url, "prune_ingest_ranges")
    assert _execute(url, "SELECT first_seq FROM ingest_ranges") == [(101,)]
    assert init_db(settings.model_copy(update={"timescale": "off"})).changes == []


@requires_timescaledb
def test_installed_but_not_preloaded_keeps_every_range(
    unpreloaded_database_url: str, settings: Settings
) -> None:
    """Plain tables on a server that has TimescaleDB but does not preload it: no job, no horizon."""
    own = settings.model_copy(
        update={"database_url": unpreloaded_database_url, "timescale_retention_days": 30}
    )
    result = init_db(own)
    assert not result.timescale and not any("ingest_ranges:" in line for line in result.changes)
    _add_range(unpreloaded_database_url, "agg_trades", 1, 100, datetime.now(UTC) - 400 * DAY)
    conn = psycopg2.connect(unpreloaded_database_url)
    try:
        with conn.cursor() as cur:
            assert timescale.read_retention(cur) == {}
            assert read_horizon(cur, datetime.now(UTC) - 500 * DAY, datetime.now(UTC)) is None
            cur.execute("SELECT count(*) FROM pg_proc WHERE proname = 'prune_ingest_ranges'")
            assert cur.fetchone() == (0,)
    finally:
        conn.close()
