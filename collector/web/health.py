"""Health: is the collector working? Gathering, judging and rendering, each in a module of its own.

- `collector.web.health_gather`: `snapshot()` reads Redis (one pipeline) and PostgreSQL; I/O only,
  it never raises for an unreachable service but records the error.
- `collector.web.health_facts`: what it read, as plain data (`HealthSnapshot`).
- `collector.web.health_judge`: `judge()`, pure: facts, the time and the thresholds in, one line
  per reason out.
- `collector.web.health_render`: `health_json()`, pure: the JSON body of `/health`.

This module is what the rest of the collector imports: `assess()` judges and renders in one call,
and the names of the parts above are re-exported. `/metrics` and `collector status` read the same
snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from collector.queue.connections import CONNECTED, ConnectionRecord
from collector.web.health_facts import HealthSnapshot, OpenGap, StreamState, TableState, age_s
from collector.web.health_gather import LOSS_WINDOW, check_postgres, now_us, report_redis, snapshot
from collector.web.health_judge import HealthThresholds, judge
from collector.web.health_render import health_json

__all__ = [
    "CONNECTED",
    "LOSS_WINDOW",
    "ConnectionRecord",
    "HealthReport",
    "HealthSnapshot",
    "HealthThresholds",
    "OpenGap",
    "StreamState",
    "TableState",
    "age_s",
    "assess",
    "check_postgres",
    "now_us",
    "report_redis",
    "snapshot",
]


@dataclass(frozen=True)
class HealthReport:
    """The verdict: healthy or not, one line per reason, and the JSON body of `/health`."""

    healthy: bool
    reasons: list[str]
    body: dict[str, Any]


def assess(snap: HealthSnapshot, now: int, thresholds: HealthThresholds) -> HealthReport:
    """Judge a snapshot at time `now` (µs) and render the body of `/health`. Pure: no I/O, no clock."""
    reasons = judge(snap, now, thresholds)
    return HealthReport(healthy=not reasons, reasons=reasons, body=health_json(snap, now, reasons))
