"""Continuous drains in real Celery workers: no beat tick needed, shards in parallel, kills and stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import redis

from collector.db.init import init_db
from collector.fake.server import FakeExchange
from collector.queue import keys, shards
from collector.queue.batches import inflight_length, queue_length
from collector.settings import Settings
from tests import factories
from tests.processes import TIMEOUT_FACTOR, Process, celery_worker, stream_process, wait_until

COLLECTOR = str(Path(sys.executable).with_name("collector"))


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url, **extra}


def _send_loop(env: dict[str, str], count: int = 1) -> None:
    """Send drain loops as beat does (one per tick), through the broker."""
    code = (
        "from collector.celery import app\n"
        f"for _ in range({count}): app.send_task('collector.tasks.ingest.drain_loop')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def _counts(settings: Settings) -> tuple[int, int]:
    conn = psycopg2.connect(settings.database_url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT (market, symbol, aggregate_trade_id)) FROM agg_trades")
        total, distinct = cur.fetchone()
    conn.close()
    return int(total), int(distinct)


def _loops(client: redis.Redis, outcome: str) -> int:
    return int(client.hget(keys.metric("drain_loop_runs"), outcome) or 0)


def _blocked_on_redis(client: redis.Redis) -> bool:
    return any(c.get("cmd") == "blpop" for c in client.client_list())


def _push(client: redis.Redis, first: int, count: int) -> None:
    """Queue trades as the stream process does: RPUSH and a wake token (collector.queue.shards.push)."""
    pipe = client.pipeline(transaction=True)
    shards.push(pipe, "agg_trades", 0, [factories.agg_trade(first + i) for i in range(count)])
    pipe.execute()


def _assert_clean(log: str) -> None:
    for bad in ("WorkerLostError", "ERROR", "Traceback", "exited with 'signal", "Restoring"):
        assert bad not in log, f"{bad!r} in the worker's log:\n{log}"


def test_a_drain_with_work_never_waits_for_a_beat_tick(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """One tick (one drain loop sent, no beat after it) stores 20 pushes made one after the other, each
    once the previous was stored, so the queue ran empty 20 times: the loop waited on Redis, not for
    ticks, and it is the only drain run there was."""
    init_db(settings)
    env = _env(settings, DRAIN_LOOPS="1")
    worker = celery_worker(env, tmp_path, concurrency=2, queues="ingest")
    try:
        _send_loop(env)
        for round_ in range(20):
            _push(redis_conn, round_ * 100, 100)
            wait_until(
                lambda r=round_: _counts(settings)[0] == (r + 1) * 100,  # type: ignore[misc]
                30,
                f"push {round_} stored (worker log: {worker.log_path})",
                interval_s=0.02,
            )
    finally:
        worker.stop()
    assert _counts(settings) == (2000, 2000)
    assert (_loops(redis_conn, "started"), _loops(redis_conn, "busy")) == (1, 0)
    _assert_clean(worker.log())


def test_two_workers_drain_two_shards_of_one_table_in_parallel(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """With QUEUE_SHARDS=2, two worker processes hold agg_trades' two shard locks at the same time;
    every trade is stored once and `collector audit` balances every run of every shard."""
    init_db(settings)
    with FakeExchange(rate=1500.0) as fake:
        env = _env(
            settings,
            BINANCE_SPOT_WS_URL=fake.spot_ws_url,
            BINANCE_FUTURES_WS_URL=fake.futures_ws_url,
            BINANCE_SPOT_REST_URL=fake.spot_rest_url,
            BINANCE_FUTURES_REST_URL=fake.futures_rest_url,
            QUEUE_SHARDS="2",
            DRAIN_LOOPS="2",
            DRAIN_BATCH_MAX_ROWS="100",
        )
        streams = stream_process(env, tmp_path)
        try:  # a backlog in both shards first, so both loops have a shard of agg_trades to work
            wait_until(
                lambda: min(redis_conn.llen(keys.queue("agg_trades", k)) for k in (0, 1)) >= 1500,
                90,
                f"trades in both shards (log: {streams.log_path})",
            )
        finally:
            assert streams.stop() == 0, streams.log()
    workers = [celery_worker(env, tmp_path, name=f"w{i}", concurrency=1, queues="ingest") for i in (1, 2)]
    holders: list[set[str]] = []

    def both_held_by_two_processes() -> bool:
        tokens = redis_conn.mget([keys.drain_lock("agg_trades", k) for k in (0, 1)])
        pids = {token.decode().split("/")[1] for token in tokens if token}
        holders.append(pids)
        return len(pids) == 2

    try:
        _send_loop(env, count=2)
        wait_until(both_held_by_two_processes, 60, "both shards locked by two processes", interval_s=0.01)
        wait_until(
            lambda: all(
                queue_length(redis_conn, t, (0, 1)) == 0 and inflight_length(redis_conn, t, (0, 1)) == 0
                for t in keys.TABLES
            ),
            120,
            "every shard drained",
        )
    finally:
        for worker in workers:
            worker.stop()
    stored, distinct = _counts(settings)
    assert stored == distinct > 3000
    printed = subprocess.run(
        [COLLECTOR, "audit"], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0, printed.stderr
    rows = [line.split() for line in printed.stdout.splitlines()[1:-1]]
    trades = [row for row in rows if row[0] == "agg_trades"]
    assert {row[1].endswith(".s1") for row in trades} == {True, False}, printed.stdout
    assert sum(int(row[6].replace(",", "")) for row in trades) == stored
    assert all(row[-1] == "balanced" for row in rows), printed.stdout
    assert printed.stdout.strip().endswith("nothing lost")
    for worker in workers:
        _assert_clean(worker.log())


def test_worker_killed_while_waiting_on_redis_loses_nothing(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """SIGKILL of a worker whose loop blocks on Redis: trades queued afterwards are stored, once, by a
    loop of the next worker, as soon as the dead loop's slot has expired."""
    init_db(settings)
    env = _env(settings, DRAIN_LOOPS="1", DRAIN_LOCK_TTL_S="3")
    doomed = celery_worker(env, tmp_path, name="doomed", concurrency=2, queues="ingest")
    try:
        _send_loop(env)
        _push(redis_conn, 0, 100)
        wait_until(lambda: _counts(settings)[0] == 100, 60, f"the first trades (log: {doomed.log_path})")
        wait_until(lambda: _blocked_on_redis(redis_conn), 30, "the idle loop blocked on Redis")
        doomed.signal_group(signal.SIGKILL)
        doomed.popen.wait(timeout=10)
    finally:
        doomed.stop()
    _push(redis_conn, 100, 1000)
    survivor = celery_worker(env, tmp_path, name="survivor", concurrency=2, queues="ingest")
    try:

        def stored() -> bool:
            _send_loop(env)  # turned away ("busy") until the dead loop's slot expires
            return _counts(settings)[0] >= 1100

        wait_until(stored, 60, f"the later trades (log: {survivor.log_path})", interval_s=1)
    finally:
        survivor.stop()
    assert _counts(settings) == (1100, 1100)
    assert queue_length(redis_conn, "agg_trades") == inflight_length(redis_conn, "agg_trades") == 0


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """SIGKILL while a loop writes leaves batches in flight; the next worker's loop recovers them and
    every trade is stored once."""
    init_db(settings)
    total = 100_000
    factories.queue_agg_trades(redis_conn, total)
    env = _env(settings, DRAIN_LOOPS="1", DRAIN_LOCK_TTL_S="3", DRAIN_BATCH_MAX_ROWS="2000")
    doomed = celery_worker(env, tmp_path, name="doomed", concurrency=2, queues="ingest")
    try:
        _send_loop(env)
        wait_until(lambda: _counts(settings)[0] > 10_000, 60, f"the first rows (log: {doomed.log_path})")
        doomed.signal_group(signal.SIGKILL)
        doomed.popen.wait(timeout=10)
    finally:
        doomed.stop()
    stored_before = _counts(settings)[0]
    left = queue_length(redis_conn, "agg_trades") + inflight_length(redis_conn, "agg_trades")
    assert stored_before < total and stored_before + left >= total
    survivor = celery_worker(env, tmp_path, name="survivor", concurrency=2, queues="ingest")
    try:

        def drained() -> bool:
            _send_loop(env)
            return _counts(settings)[0] >= total

        wait_until(drained, 90, f"every row after the restart (log: {survivor.log_path})", interval_s=1)
    finally:
        survivor.stop()
    assert _counts(settings) == (total, total)
    assert queue_length(redis_conn, "agg_trades") == inflight_length(redis_conn, "agg_trades") == 0
    assert "drain.recovering table=agg_trades shard=0" in survivor.log()


def _stop(worker: Process) -> tuple[int, float]:
    """SIGTERM to the worker's group, as `make stop` sends it: (exit code, seconds it took)."""
    started = time.monotonic()
    worker.signal_group(signal.SIGTERM)
    code = worker.popen.wait(timeout=60 * TIMEOUT_FACTOR)
    return code, time.monotonic() - started


def test_warm_shutdown_cuts_a_blocking_wait_short(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """SIGTERM to a worker whose loop blocks on Redis for up to 15 s ends the wait at once: the worker
    exits cleanly long before the wait would have timed out."""
    init_db(settings)
    env = _env(settings, DRAIN_LOOPS="1", DRAIN_IDLE_WAIT_S="15")
    worker = celery_worker(env, tmp_path, name="idle", concurrency=2, queues="ingest")
    try:
        _send_loop(env)
        wait_until(lambda: _loops(redis_conn, "started") == 1, 60, f"the loop (log: {worker.log_path})")
        wait_until(lambda: _blocked_on_redis(redis_conn), 30, "the idle loop blocked on Redis")
        code, took_s = _stop(worker)
    finally:
        worker.stop()
    assert code == 0, worker.log()
    _assert_clean(worker.log())
    assert took_s < 12, f"the stop waited out the blocking wait ({took_s:.1f} s)"
    assert not redis_conn.zrange(keys.DRAIN_LOOPS, 0, -1)  # the slot was given back


def test_warm_shutdown_lets_the_loop_finish_its_batch(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """SIGTERM while a loop writes: it commits and acknowledges the batch in hand and returns; exit 0,
    nothing in flight, every trade either stored or still queued."""
    init_db(settings)
    total = 200_000
    factories.queue_agg_trades(redis_conn, total)
    env = _env(settings, DRAIN_LOOPS="1", DRAIN_BATCH_MAX_ROWS="1000")
    worker = celery_worker(env, tmp_path, name="stopping", concurrency=2, queues="ingest")
    try:
        _send_loop(env)
        wait_until(lambda: _counts(settings)[0] > 0, 60, f"the first rows (log: {worker.log_path})")
        code, _ = _stop(worker)
    finally:
        worker.stop()
    assert code == 0, worker.log()
    _assert_clean(worker.log())
    stored = _counts(settings)[0]
    assert inflight_length(redis_conn, "agg_trades") == 0
    assert stored + queue_length(redis_conn, "agg_trades") == total
