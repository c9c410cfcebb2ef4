"""The Celery beat schedule, built from the settings by a pure function.

Every entry names its queue and carries `expires`, so a beat that ran while workers were down does
not leave a pile of stale runs behind (Sentry's rule): a missed tick is simply folded into the next.
"""

from __future__ import annotations

from typing import Any

from collector.settings import Settings

QUEUE_INGEST = "ingest"
QUEUE_REST = "rest"
QUEUE_ALERTS = "alerts"
QUEUES = (QUEUE_INGEST, QUEUE_REST, QUEUE_ALERTS)

REST_POLL_TICK_S = 1.0

# task name -> queue; `celeryconfig.task_routes` is derived from this.
TASK_QUEUES = {
    "collector.tasks.ingest.drain": QUEUE_INGEST,
    "collector.tasks.ingest.drain_loop": QUEUE_INGEST,
    "collector.tasks.rest.poll_due": QUEUE_REST,
    "collector.tasks.rest.open_interest": QUEUE_REST,
    "collector.tasks.rest.depth_snapshot": QUEUE_REST,
    "collector.tasks.alerts.evaluate": QUEUE_ALERTS,
}


def _entry(
    task: str, every_s: float, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "task": task,
        "schedule": every_s,
        "args": args,
        "kwargs": kwargs or {},
        # A run that could not start within its own period is superseded by the next one.
        "options": {"queue": TASK_QUEUES[task], "expires": max(every_s, 1.0)},
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The drain loops' keeper, the REST poll tick and the alert check.

    The drains are continuous (collector.drain_loop): every DRAIN_INTERVAL_S beat sends one drain
    loop, which starts if fewer than DRAIN_LOOPS run and returns at once otherwise, so a loop that
    ended (a worker restarted, PostgreSQL was away) is replaced within a tick.

    The tick runs every REST_POLL_TICK_S; which open-interest and depth-snapshot calls it sends is
    decided by `collector.rest.planner` (OPEN_INTEREST_INTERVAL_S, DEPTH_SNAPSHOT_INTERVAL_S, spread
    evenly over each interval and stretched when the weight budget requires).
    """
    schedule = {"drain-loops": _entry("collector.tasks.ingest.drain_loop", settings.drain_interval_s)}
    schedule["rest-poll"] = _entry("collector.tasks.rest.poll_due", REST_POLL_TICK_S)
    schedule["alerts"] = _entry("collector.tasks.alerts.evaluate", settings.alert_interval_s)
    return schedule
