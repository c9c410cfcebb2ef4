"""Start the collector's real processes (Celery worker/beat, stream process) for tests, and stop them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collector.fake.server import FakeExchange
    from collector.settings import Settings

BIN = Path(sys.executable).parent
TIMEOUT_FACTOR = float(os.environ.get("TIMEOUT_FACTOR", "1"))


class Process:
    """A child process in its own session, with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            args,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.popen.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, wait, then SIGKILL the whole group. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s * TIMEOUT_FACTOR)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.popen.wait(timeout=10)
        self.signal_group(signal.SIGKILL)  # leftover pool children
        self._log.close()
        return self.popen.returncode


def collector_env(settings: Settings, fake: FakeExchange, **extra: str) -> dict[str, str]:
    """The environment of a collector process pointed at the test's Redis, PostgreSQL and fake exchange."""
    return {
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "ALERT_LOG": str(settings.alert_log),
        "BINANCE_SPOT_WS_URL": fake.spot_ws_url,
        "BINANCE_FUTURES_WS_URL": fake.futures_ws_url,
        "BINANCE_SPOT_REST_URL": fake.spot_rest_url,
        "BINANCE_FUTURES_REST_URL": fake.futures_rest_url,
        **extra,
    }


def celery_worker(
    env: Mapping[str, str],
    log_dir: Path,
    name: str = "worker",
    concurrency: int = 2,
    queues: str = "ingest,rest,alerts",
) -> Process:
    return Process(
        name,
        [
            str(BIN / "celery"),
            "-A",
            "collector",
            "worker",
            "-Q",
            queues,
            f"--concurrency={concurrency}",
            "--loglevel=INFO",
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
        ],
        env,
        log_dir,
    )


def celery_beat(env: Mapping[str, str], log_dir: Path) -> Process:
    return Process(
        "beat",
        [
            str(BIN / "celery"),
            "-A",
            "collector",
            "beat",
            "--loglevel=INFO",
            "--schedule",
            str(log_dir / "celerybeat-schedule"),
        ],
        env,
        log_dir,
    )


def stream_process(env: Mapping[str, str], log_dir: Path) -> Process:
    return Process("streams", [str(BIN / "collector"), "streams"], env, log_dir)


def wait_until(
    condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.2
) -> object:
    """Poll `condition` until it is truthy; fail with `what` after `timeout_s` (scaled by TIMEOUT_FACTOR)."""
    deadline = time.monotonic() + timeout_s * TIMEOUT_FACTOR
    last: object = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


async def until(
    condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.02
) -> None:
    """`wait_until` inside a running event loop: poll between the loop's other tasks, not blocking them."""
    deadline = time.monotonic() + timeout_s * TIMEOUT_FACTOR
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        await asyncio.sleep(interval_s)
