"""The Celery app (`celery -A collector ...` finds it here), configured by the top-level `celeryconfig`."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

app = Celery(
    "collector",
    include=["collector.tasks.ingest", "collector.tasks.rest", "collector.tasks.alerts"],
)
app.config_from_object("celeryconfig")

# Beat sends a drain per table every second: Celery's "Task … received" and "Task … succeeded" at
# INFO would be ten lines a second burying the useful ones. Failures are still logged (ERROR).
QUIETED_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


@signals.after_setup_logger.connect
def _quiet_routine_task_lines(**_: Any) -> None:
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
