"""The drain task: one per table, every DRAIN_INTERVAL_S, moving Redis queues into PostgreSQL."""

from __future__ import annotations

import psycopg2
import redis
from celery.utils.log import get_task_logger
from psycopg2.extensions import connection as Connection

from collector.db.connection import connect
from collector.drain import Drainer
from collector.logonce import Transitions
from collector.queue.client import redis_client
from collector.retry import is_transient
from collector.settings import get_settings
from collector.tasks.base import collector_task

logger = get_task_logger(__name__)

# One PostgreSQL connection and one Redis client per worker process, reused across runs
# (a drain runs every second per table: connecting each time would cost more than the work).
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


@collector_task("collector.tasks.ingest.drain", soft_time_limit_s=60, time_limit_s=90)
def drain(table: str) -> None:
    """Move `table`'s queued envelopes into PostgreSQL.

    Idempotence key: each row's natural key (see collector.db.schema.NATURAL_KEYS). A duplicate
    run finds the lock taken and returns, or finds nothing new; a re-delivered batch inserts nothing twice.
    """
    drainer = Drainer(get_settings(), _redis_client(), _connection)
    postgres = _postgres_states.setdefault(table, Transitions(logger, f"drain.{table}.postgres"))
    redis_state = _redis_states.setdefault(table, Transitions(logger, f"drain.{table}.redis"))
    try:
        drainer.drain(table)
    except Exception as error:
        if not isinstance(error, redis.RedisError):
            _forget_connection()  # a transaction left aborted would fail every later run on it
        if not is_transient(error):
            raise  # a bug or a bad setting: Celery records the failure; the batch stays in flight
        # The batch stays in flight and is written by a later run; beat retries every second, so
        # only the change is logged (collector.logonce), not a line a second.
        if isinstance(error, redis.RedisError):
            redis_state.report(up=False, error=error)
        else:
            postgres.report(up=False, error=str(error).splitlines()[0] if str(error) else error)
        return
    postgres.report(up=True)
    redis_state.report(up=True)
