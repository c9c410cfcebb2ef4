"""A worker's warm shutdown, told to the long-running tasks in its pool processes.

Celery's warm shutdown waits for running tasks, but tells them nothing: a drain loop would run on
until DRAIN_LOOP_MAX_S. So the master, when its shutdown begins (`worker_shutting_down`, wired in
`collector.celery`), sends STOP_SIGNAL to its pool processes; the handler marks the process as
stopping, and a loop ends after the batch it is writing. A loop blocked on Redis waiting for work is
inside `interruptible()`: there the handler raises `StopRequested`, which cuts the wait short (the
waiting connection is then thrown away), so `make stop` never waits out a blocking timeout.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Final, TypeVar

# SIGUSR1 is billiard's soft time limit; SIGUSR2 is free (Celery uses it only under CELERY_RDBSIG).
STOP_SIGNAL: Final = signal.SIGUSR2

T = TypeVar("T")

_stopping = False
_interruptible = False


class StopRequested(BaseException):
    """Raised inside `interruptible()` when the worker's shutdown begins (a BaseException, so no
    `except Exception` on the way mistakes it for a failure)."""


def requested() -> bool:
    """Whether this process's worker is shutting down."""
    return _stopping


def request() -> None:
    """Mark this process as stopping (the master does it for a solo pool, where tasks run in it)."""
    global _stopping
    _stopping = True


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    request()
    if _interruptible:
        raise StopRequested


def install() -> None:
    """Handle STOP_SIGNAL in this process (and in the pool processes it forks afterwards)."""
    signal.signal(STOP_SIGNAL, _on_stop_signal)


# Set by the master before it forks each pool process (`collector.celery`); inherited by the child.
POOL_PROCESSES_ENV: Final = "COLLECTOR_POOL_PROCESSES"


def pool_processes() -> int | None:
    """How many processes this worker's pool has; None when unknown (a solo or thread pool)."""
    value = os.environ.get(POOL_PROCESSES_ENV, "")
    return int(value) if value.isdigit() else None


def interruptible(wait: Callable[[], T], default: T) -> T:
    """Run `wait` (a blocking call whose caller can lose it midway); `default` if the shutdown cut it."""
    global _interruptible
    _interruptible = True
    try:
        if _stopping:
            return default
        return wait()
    except StopRequested:
        return default
    finally:
        _interruptible = False
