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

# Beat sends a drain-loop keeper and an alert check every second: Celery's "Task … received" and
# "Task … succeeded" at INFO (workers) and "Scheduler: Sending due task …" (beat) would be lines
# every second burying the useful ones, such as beat's `rest.plan`. Failures are still logged
# (WARNING and above).
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


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _master_handles_the_stop_signal(**_: Any) -> None:
    """The stop signal's handler, installed before the pool forks: every pool process has it from birth
    (a pool process signalled before a handler of its own would die of it)."""
    from collector.tasks import stopping

    stopping.install()


@signals.worker_before_create_process.connect  # type: ignore[untyped-decorator]
def _pool_size_for_the_children(sender: Any, **_: Any) -> None:
    """Tell the pool processes about to be forked how many they are: a drain loop leaves one free."""
    from collector.tasks import stopping

    size = getattr(sender, "_processes", None)  # billiard's Pool keeps its size there
    if isinstance(size, int):
        os.environ[stopping.POOL_PROCESSES_ENV] = str(size)


@signals.worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _tell_the_pool_processes(**_: Any) -> None:
    """A warm (or cold) shutdown begins: drain loops end after their batch (collector.tasks.stopping).

    Runs in the master, inside its signal handler: only a flag and `kill`, nothing that could block.
    """
    import billiard.process

    from collector.tasks import stopping

    stopping.request()  # a solo pool runs the tasks in this very process
    for child in billiard.process.active_children():
        if child.pid is not None:
            try:
                os.kill(child.pid, stopping.STOP_SIGNAL)
            except ProcessLookupError:
                pass


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
