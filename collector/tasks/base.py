"""One decorator declares every task: explicit dotted name, its queue, time limits, no results.

Tasks are thin shells: they take a lock, call one domain function and record what happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from collector.celery import app
from collector.schedule import TASK_QUEUES

F = TypeVar("F", bound=Callable[..., Any])


def collector_task(
    name: str, soft_time_limit_s: int = 60, time_limit_s: int = 90, **options: Any
) -> Callable[[F], Any]:
    """Register `name`, which must be listed in `collector.schedule.TASK_QUEUES`.

    Its queue comes from `celeryconfig.task_routes` (derived from that table), not a task attribute,
    which Celery deprecates.
    """
    if name not in TASK_QUEUES:
        raise KeyError(f"task {name!r} has no queue in collector.schedule.TASK_QUEUES")

    def decorator(func: F) -> Any:
        return app.task(
            name=name,
            ignore_result=True,
            acks_late=True,
            soft_time_limit=soft_time_limit_s,
            time_limit=time_limit_s,
            **options,
        )(func)

    return decorator
