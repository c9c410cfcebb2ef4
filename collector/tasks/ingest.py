"""The drain task: one per table, every DRAIN_INTERVAL_S, moving Redis queues into PostgreSQL."""

from __future__ import annotations

import psycopg2
import redis
from celery.utils.log import get_task_logger
from psycopg2.extensions import connection as Connection

from collector.db.connection import connect
from collector.drain import Drainer
from collector.errors import ServiceUnavailable
from collector.queue.client import redis_client
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
    try:
        drainer.drain(table)
    except (ServiceUnavailable, psycopg2.OperationalError, psycopg2.InterfaceError) as error:
        # The batch stays in flight and is written by a later run; beat retries every second.
        _forget_connection()
        logger.warning("drain.postgres_unavailable table=%s error=%s", table, str(error).splitlines()[0])
    except redis.RedisError as error:
        logger.warning("drain.redis_unavailable table=%s error=%s", table, error)
