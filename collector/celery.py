"""The Celery app (`celery -A collector ...` finds it here), configured by the top-level `celeryconfig`."""

from __future__ import annotations

from celery import Celery

app = Celery(
    "collector",
    include=["collector.tasks.ingest", "collector.tasks.rest", "collector.tasks.alerts"],
)
app.config_from_object("celeryconfig")
