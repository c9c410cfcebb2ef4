"""Stopping a real Celery worker as honcho and systemd do: SIGTERM to its whole process group."""

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
from tests.processes import TIMEOUT_FACTOR, celery_worker, wait_until


def _send_drain(env: dict[str, str], **options: float) -> None:
    """Send one drain of agg_trades, with Celery `options` (time limits), as `collector trigger` does."""
    code = (
        "from collector.celery import app; "
        f"app.send_task('collector.tasks.ingest.drain', args=['agg_trades'], **{options!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_sigterm_to_the_process_group_is_a_warm_shutdown(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """SIGTERM to the worker's whole group (as `make stop` sends it) lets the running drain finish:
    exit 0, no lost worker, no error, the batch acknowledged and nothing left in flight."""
    init_db(settings)
    total = 200_000
    factories.queue_agg_trades(redis_conn, total)
    env = {
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "DRAIN_BATCH_MAX_ROWS": "1000",
        "DRAIN_RUN_MAX_S": str(4 * TIMEOUT_FACTOR),  # the drain is still running when the signal comes
    }
    worker = celery_worker(env, tmp_path, name="stopping", concurrency=3)
    try:
        _send_drain(env)
        wait_until(
            lambda: factories.stored_agg_trades(settings.database_url) > 0,
            60,
            f"the first rows (worker log: {worker.log_path})",
        )
        at_signal = factories.stored_agg_trades(settings.database_url)
        worker.signal_group(signal.SIGTERM)
        code = worker.popen.wait(timeout=60 * TIMEOUT_FACTOR)
    finally:
        worker.stop()
    log = worker.log()
    assert code == 0, log
    for bad in ("WorkerLostError", "ERROR", "Traceback", "exited with 'signal", "Restoring"):
        assert bad not in log, f"{bad!r} in the worker's log:\n{log}"
    stored = factories.stored_agg_trades(settings.database_url)
    assert stored > at_signal, "the drain stopped at the signal instead of finishing its run"
    assert inflight_length(redis_conn, "agg_trades") == 0  # every claimed batch committed and acknowledged
    assert stored + redis_conn.llen(keys.queue("agg_trades")) == total


def test_hard_time_limit_still_kills_a_stuck_task(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """A pool process in a process group of its own is still killed past its hard time limit, and the
    next drain writes the batch it left in flight."""
    init_db(settings)
    redis_conn.rpush(keys.queue("agg_trades"), *[factories.agg_trade(i) for i in range(100)])
    env = {"REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url, "DRAIN_LOCK_TTL_S": "3"}
    blocker = psycopg2.connect(settings.database_url)
    worker = celery_worker(env, tmp_path, name="stuck", concurrency=1)
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE agg_trades IN ACCESS EXCLUSIVE MODE")  # the drain's COPY waits on it
        _send_drain(env, soft_time_limit=1, time_limit=2)
        wait_until(
            lambda: "exited with 'signal" in worker.log(),
            30,
            f"the stuck pool process killed (worker log: {worker.log_path})",
        )
        assert "Hard time limit (2s) exceeded" in worker.log()
        blocker.rollback()

        def drained() -> bool:
            if factories.stored_agg_trades(settings.database_url) == 100:
                return True
            _send_drain(env)  # another try: the killed drain's lock expires after 3 s
            return False

        wait_until(drained, 60, "the batch left in flight, written by a later drain", interval_s=1)
    finally:
        blocker.close()
        worker.stop()
    assert inflight_length(redis_conn, "agg_trades") == 0
