"""Celery shell of the liquidation alerts: one evaluation at a time, under a Redis lock."""

from __future__ import annotations

from typing import Any, Final

import redis
from celery.utils.log import get_task_logger

from collector.alerts.evaluate import evaluate_alerts
from collector.db.connection import connect
from collector.logonce import Transitions
from collector.queue.client import redis_client
from collector.queue.locks import alerts_lock
from collector.retry import is_transient
from collector.settings import get_settings
from collector.tasks.base import collector_task

logger = get_task_logger(__name__)
# Per worker process: the state of each service as this process last saw it (collector.logonce).
_postgres = Transitions(logger, "alerts.postgres")
_redis = Transitions(logger, "alerts.redis")

SOFT_TIME_LIMIT_S: Final = 45
TIME_LIMIT_S: Final = 60
# The lock outlives the longest possible run (the hard time limit), so it is never lost while the
# task still works; a worker killed outright blocks alerts for at most this long.
LOCK_TTL_MS: Final = TIME_LIMIT_S * 1000


@collector_task(
    "collector.tasks.alerts.evaluate", soft_time_limit_s=SOFT_TIME_LIMIT_S, time_limit_s=TIME_LIMIT_S
)
def evaluate() -> dict[str, Any] | None:
    """Decide alerts for new liquidations, write them to ALERT_LOG and publish them.

    Idempotence key: `alert_key` (rule + the liquidation's natural key) and the `force_orders`
    cursor. A duplicate or retried run finds the rows already past the cursor, the alerts already
    decided and the lines already in the log: it writes nothing twice. Overlapping runs are turned
    away by the lock (`alerts.lock_busy`) and leave the work to the one holding it.
    """
    settings = get_settings()
    client = redis_client(settings)
    lock = alerts_lock(client, LOCK_TTL_MS)
    try:
        try:
            if not lock.acquire():
                logger.debug("alerts.lock_busy")
                return None
        except redis.RedisError as error:
            if not is_transient(error):
                raise
            _redis.report(up=False, error=error)  # beat runs this every second: one line, not one a second
            return None
        _redis.report(up=True)
        try:
            conn = connect(settings)
            try:
                summary = evaluate_alerts(settings, conn, client)
            finally:
                conn.close()
        except Exception as error:
            if not is_transient(error):
                raise  # a bug or a bad setting: Celery records the failure with its traceback
            # Nothing is lost: the cursor moves only with what was decided and stored, and alerts
            # not yet published are published by the next run, which starts where this one stopped.
            if isinstance(error, redis.RedisError):
                _redis.report(up=False, error=error)
            else:
                _postgres.report(
                    up=False, error=str(error).strip().splitlines()[0] if str(error).strip() else error
                )
            return None
        finally:
            lock.release()  # only if still ours: after an expiry another run may hold it
        _postgres.report(up=True)
        return {
            "rows": summary.rows,
            "alerts": summary.alerts,
            "written": summary.written,
            "published": summary.published,
        }
    finally:
        client.close()
