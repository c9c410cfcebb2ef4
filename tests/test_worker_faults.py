"""Fault tests with a real Celery worker: killed mid-batch, duplicated deliveries, manual triggering."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg2
import redis

from collector.db.init import init_db
from collector.queue import keys
from collector.queue.batches import inflight_length
from collector.settings import Settings
from tests import factories
from tests.processes import celery_worker, wait_until


def _counts(settings: Settings, table: str, key: str) -> tuple[int, int]:
    conn = psycopg2.connect(settings.database_url)
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*), count(DISTINCT ({key})) FROM {table}")
        total, distinct = cur.fetchone()
    conn.close()
    return int(total), int(distinct)


def _trigger(what: list[str], env: dict[str, str]) -> None:
    collector = str(Path(sys.executable).with_name("collector"))
    done = subprocess.run(
        [collector, "trigger", *what], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """SIGKILL of the worker while it drains leaves batches in flight; a new worker writes them once."""
    init_db(settings)
    total = 150_000
    factories.queue_agg_trades(redis_conn, total)
    env = {
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "DRAIN_LOCK_TTL_S": "3",
        "DRAIN_BATCH_MAX_ROWS": "2000",
    }
    worker = celery_worker(env, tmp_path, name="doomed")
    try:
        _trigger(["drain", "--table", "agg_trades"], env)
        wait_until(
            lambda: _counts(settings, "agg_trades", "aggregate_trade_id")[0] > 10_000,
            60,
            f"the first rows (worker log: {worker.log_path})",
        )
        worker.signal_group(signal.SIGKILL)
        worker.popen.wait(timeout=10)
    finally:
        worker.stop()
    stored_before, _ = _counts(settings, "agg_trades", "aggregate_trade_id")
    left = redis_conn.llen(keys.queue("agg_trades")) + inflight_length(redis_conn, "agg_trades")
    assert stored_before < total and left > 0
    assert stored_before + left >= total  # nothing vanished: what is not stored is queued or in flight

    survivor = celery_worker(env, tmp_path, name="survivor")
    try:

        def drained() -> bool:
            _trigger(["drain", "--table", "agg_trades"], env)  # the lock of the dead worker expires in 3 s
            return _counts(settings, "agg_trades", "aggregate_trade_id")[0] >= total

        wait_until(drained, 90, "every row after the restart", interval_s=2)
    finally:
        survivor.stop()
    assert _counts(settings, "agg_trades", "aggregate_trade_id") == (total, total)
    assert inflight_length(redis_conn, "agg_trades") == 0 and redis_conn.llen(keys.queue("agg_trades")) == 0
    assert "drain.recovering table=agg_trades" in survivor.log()


def test_same_events_delivered_twice_through_the_worker(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """Every table, fed each event twice, stores each once when drained by the real worker."""
    init_db(settings)
    batches = {
        "agg_trades": [factories.agg_trade(i) for i in range(500)],
        "depth_updates": [factories.depth_update(i) for i in range(500)],
        "mark_prices": [factories.mark_price_frame(i) for i in range(50)],
        "force_orders": [factories.force_order(i) for i in range(50)],
        "open_interest": [factories.open_interest(i) for i in range(20)],
        "depth_snapshots": [factories.depth_snapshot(i) for i in range(20)],
    }
    for table, items in batches.items():
        redis_conn.rpush(keys.queue(table), *items)
        redis_conn.rpush(keys.queue(table), *items)
    env = {"REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url}
    worker = celery_worker(env, tmp_path)
    try:
        for table in batches:
            _trigger(["drain", "--table", table], env)
        wait_until(
            lambda: all(
                redis_conn.llen(keys.queue(t)) == 0
                and inflight_length(redis_conn, t) == 0
                and redis_conn.hget(keys.DRAIN_LAST_SUCCESS_US, t)
                for t in batches
            ),
            60,
            "drains",
        )
    finally:
        worker.stop()
    expected = {
        "agg_trades": 500,
        "depth_updates": 500,
        "mark_prices": 100,
        "force_orders": 50,
        "open_interest": 20,
        "depth_snapshots": 20,
    }
    conn = psycopg2.connect(settings.database_url)
    with conn.cursor() as cur:
        for table, count in expected.items():
            cur.execute(f"SELECT count(*) FROM {table}")
            assert cur.fetchone()[0] == count, table
    conn.close()
    assert int(redis_conn.hget(keys.metric("rows_duplicate"), "agg_trades")) == 500
