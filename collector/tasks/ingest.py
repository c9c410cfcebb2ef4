"""The drain tasks: the continuous drain loops that beat keeps running, and the one-shot drain of a table."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import psycopg2
import redis
from celery.utils.log import get_task_logger
from psycopg2.extensions import connection as Connection

from collector.db.connection import connect
from collector.drain import Drainer
from collector.drain_loop import DrainLoop
from collector.logonce import Transitions
from collector.queue.client import redis_client
from collector.queue.shards import wait_for_work
from collector.retry import is_transient
from collector.settings import Settings, get_settings
from collector.tasks import stopping
from collector.tasks.base import collector_task

logger = get_task_logger(__name__)

# One PostgreSQL connection and one Redis client per worker process, reused across runs
# (beat sends a drain loop every second: connecting each time would cost more than the work).
_conn: Connection | None = None
_redis: redis.Redis | None = None


def _connection() -> Connection:
    global _conn
    if _conn is None or _conn.closed:
        _conn = connect(get_settings())
    return _conn


# Per worker process and table: whether PostgreSQL and Redis answered the last drain.
_postgres_states: dict[str, Transitions] = {}
_redis_states: dict[str, Transitions] = {}


def _forget_connection() -> None:
    global _conn
    if _conn is not None:
        try:
            _conn.close()
        except psycopg2.Error:
            pass
    _conn = None


def _redis_client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis_client(get_settings())
    return _redis


# A loop runs at most DRAIN_LOOP_MAX_S (le=600); the limits are the backstop for a stuck batch.
LOOP_SOFT_TIME_LIMIT_S = 660
LOOP_TIME_LIMIT_S = 720


@collector_task(
    "collector.tasks.ingest.drain_loop",
    soft_time_limit_s=LOOP_SOFT_TIME_LIMIT_S,
    time_limit_s=LOOP_TIME_LIMIT_S,
)
def drain_loop() -> None:
    """Drain every queue shard with work, continuously, for up to DRAIN_LOOP_MAX_S (collector.drain_loop).

    Idempotence key: a loop slot (DRAIN_LOOPS of them, in Redis). Beat sends one every DRAIN_INTERVAL_S
    so that DRAIN_LOOPS always run: a duplicate or surplus run finds every slot taken and returns at
    once; rows are keyed as in `drain`. A loop that ran its time sends its successor, so the drains
    never pause for a beat tick; a warm shutdown ends it after its batch, without a successor.
    """
    settings = get_settings()
    waiter = redis_client(_waiting(settings))
    loop = DrainLoop(
        settings,
        _redis_client(),
        _connection,
        wait=lambda timeout_s: stopping.interruptible(lambda: wait_for_work(waiter, timeout_s), False),
        stopping=stopping.requested,
        node=drain_loop.request.hostname or "",
        pool_processes=stopping.pool_processes(),
    )
    try:
        outcome = _guarded("loop", loop.run)
    except stopping.StopRequested:
        outcome = "stopped"  # the shutdown came just around a wait: the loop's own cleanup has run
    finally:
        waiter.close()  # a wait cut short leaves this connection mid-reply: never reused
    if outcome == "expired" and not stopping.requested():
        drain_loop.apply_async()


def _waiting(settings: Settings) -> Settings:
    """Settings for the client that blocks: its socket waits out the blocking timeout, and then some."""
    timeout_s = settings.redis_socket_timeout_s + settings.drain_idle_wait_s
    return settings.model_copy(update={"redis_socket_timeout_s": timeout_s})


@collector_task("collector.tasks.ingest.drain", soft_time_limit_s=60, time_limit_s=90)
def drain(table: str) -> None:
    """Move `table`'s queued envelopes into PostgreSQL once (`collector trigger drain`).

    Idempotence key: each row's natural key (see collector.db.schema.NATURAL_KEYS). A duplicate
    run finds the shards locked and returns, or finds nothing new; a re-delivered batch inserts nothing twice.
    """
    drainer = Drainer(get_settings(), _redis_client(), _connection)
    _guarded(table, lambda: drainer.drain(table))


T = TypeVar("T")


def _guarded(name: str, run: Callable[[], T]) -> T | None:
    """Run a drain; a transient failure (PostgreSQL or Redis away) is logged once per change, not raised.

    The batch stays in flight and is written by a later run; beat retries every second, so only the
    change is logged (collector.logonce), not a line a second. Anything else is raised: a bug or a bad
    setting, which Celery records.
    """
    postgres = _postgres_states.setdefault(name, Transitions(logger, f"drain.{name}.postgres"))
    redis_state = _redis_states.setdefault(name, Transitions(logger, f"drain.{name}.redis"))
    try:
        outcome = run()
    except Exception as error:
        if not isinstance(error, redis.RedisError):
            _forget_connection()  # a transaction left aborted would fail every later run on it
        if not is_transient(error):
            raise
        if isinstance(error, redis.RedisError):
            redis_state.report(up=False, error=error)
        else:
            postgres.report(up=False, error=str(error).splitlines()[0] if str(error) else error)
        return None
    postgres.report(up=True)
    redis_state.report(up=True)
    return outcome
