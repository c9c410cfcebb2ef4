"""The Celery app (`celery -A collector ...` finds it here), configured by the top-level `celeryconfig`."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

app = Celery(
    "collector",
    include=["collector.tasks.ingest", "collector.tasks.rest", "collector.tasks.alerts"],
)
app.config_from_object("celeryconfig")

# Beat sends a drain per table every second: Celery's "Task … received" and "Task … succeeded" at
# INFO (workers) and "Scheduler: Sending due task …" (beat) would be ten lines a second burying the
# useful ones, such as beat's `rest.plan`. Failures are still logged (WARNING and above).
QUIETED_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.beat")


@signals.after_setup_logger.connect  # type: ignore[untyped-decorator]  # Celery ships no types
def _quiet_routine_task_lines(**_: Any) -> None:
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _pool_process_leaves_the_masters_process_group(**_: Any) -> None:
    """A pool process moves to a process group of its own: only its master signals it.

    honcho (`make stop`, Ctrl-C) signals each process's whole group (`os.killpg`). A pool process
    still in its master's group took that SIGTERM itself and died mid-task (WorkerLostError, the task
    redelivered) while the master's warm shutdown was waiting for that very task. Out of the group,
    the master's warm shutdown alone decides: running tasks finish, then the pool closes. Everything
    Celery does to a pool process goes to its pid and keeps working: SIGTERM on a hard time limit
    (billiard then SIGKILLs the pool process's own group), on a cold shutdown or a revoke with
    terminate; honcho's last-resort SIGKILL of the group kills the master, and with it every pool
    process (the parent-death signal, SIGKILL, that Celery sets). Ignoring SIGTERM here instead would
    leave cold shutdowns and revokes waiting for the task. Under Docker only PID 1 (the master) is
    signalled, and SIGKILL after the grace period ends the container's every process.
    """
    os.setpgid(0, 0)


@signals.beat_init.connect  # type: ignore[untyped-decorator]
def _beat_announces_the_rest_plan(**_: Any) -> None:
    # The REST plan at start, with its numbers (needed vs available weight, stretched intervals).
    # With `*_SYMBOLS=ALL` the symbol count is known once the stream process has published it; the
    # poll tick announces any later change.
    from collector.queue.client import redis_client
    from collector.rest.planner import announce, plans_for, symbols_by_market, weight_limits
    from collector.settings import get_settings

    settings = get_settings()
    client = redis_client(settings)
    try:
        symbols = symbols_by_market(settings, client)
        announce(
            plans_for(settings, symbols, weight_limits(settings, client, symbols, refresh=False)),
            client,
            always=True,
        )
    finally:
        client.close()
