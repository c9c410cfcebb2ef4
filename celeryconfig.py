"""Celery configuration: maps the collector's settings to Celery's names, nothing more."""

from __future__ import annotations

import os
import sys
from urllib.parse import parse_qs, urlencode, urlsplit

from kombu.entity import Queue

from collector.errors import ConfigError, ServiceUnavailable, error_lines
from collector.preflight import celery_needs, check_services
from collector.schedule import QUEUES, TASK_QUEUES
from collector.schedule import beat_schedule as build_beat_schedule
from collector.settings import get_settings

try:
    _settings = get_settings()
except ConfigError as error:
    # `celery -A collector worker|beat` would show the whole traceback: one line per bad variable.
    print(error_lines(error), file=sys.stderr)
    raise SystemExit(2) from None


if os.path.basename(sys.argv[0]) == "celery":  # not `collector web`, `collector trigger`, Flower
    # Without Redis (the broker) Celery retries forever, a traceback each time; a worker without
    # PostgreSQL would take drains it cannot do. One line naming each service that is down, exit 2.
    # `celery_needs` says what `worker` and `beat` need and why; other sub-commands need nothing here.
    try:
        check_services(_settings, celery_needs(sys.argv[1:]))
    except ServiceUnavailable as error:
        print(error_lines(error), file=sys.stderr)  # the hint that fits is in the message
        raise SystemExit(2) from None


def _broker_url(redis_url: str) -> str:
    """REDIS_URL as kombu reads it: `unix:///PATH?db=N` is kombu's `redis+socket:///PATH?virtual_host=N`."""
    if not redis_url.startswith("unix://"):
        return redis_url  # redis:// and rediss:// read the same in both (Settings refused the rest)
    parts = urlsplit(redis_url)
    query = parse_qs(parts.query)
    query["virtual_host"] = query.pop("db", ["0"])
    return f"redis+socket://{parts.netloc}{parts.path}?{urlencode(query, doseq=True)}"


broker_url = _broker_url(_settings.redis_url)
broker_connection_retry_on_startup = True
broker_transport_options = {
    # A task taken by a worker that died is redelivered after this long (kombu's visibility timeout);
    # it must exceed the longest task so a slow run is not delivered twice.
    "visibility_timeout": 3600,
    "socket_timeout": _settings.redis_socket_timeout_s,
    "socket_connect_timeout": _settings.redis_socket_timeout_s,
}

task_queues = [Queue(name) for name in QUEUES]  # type: ignore[no-untyped-call]  # kombu ships no types
task_default_queue = "ingest"
task_routes = {name: {"queue": queue} for name, queue in TASK_QUEUES.items()}

task_acks_late = True
task_reject_on_worker_lost = True
task_ignore_result = True
result_backend = None
worker_prefetch_multiplier = 1
task_soft_time_limit = 120
task_time_limit = 180
task_serializer = "json"
accept_content = ["json"]
timezone = "UTC"
enable_utc = True
worker_hijack_root_logger = False

beat_schedule = build_beat_schedule(_settings)
