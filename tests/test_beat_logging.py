"""Beat started exactly as the Procfiles start it: it announces the REST plan, and stays quiet otherwise."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import redis
import yaml

from collector.schedule import QUEUE_INGEST
from collector.settings import Settings
from tests.processes import BIN, Process, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _beat_argv(procfile: str, schedule: Path) -> list[str]:
    """The Procfile's beat command, run from this venv with its schedule file under `schedule`."""
    for line in (ROOT / procfile).read_text().splitlines():
        match = re.match(r"^beat:\s*(.+)$", line)
        if match:
            argv = shlex.split(match.group(1))
            argv[0] = str(BIN / argv[0])
            argv[argv.index("--schedule") + 1] = str(schedule)
            return argv
    raise AssertionError(f"{procfile} has no beat line")


@pytest.mark.parametrize("procfile", ["Procfile", "Procfile.demo"])
def test_beat_logs_the_rest_plan_and_not_every_task_it_sends(
    procfile: str, settings: Settings, tmp_path: Path
) -> None:
    """The beat line logs `rest.plan` for each market at start, but not Celery's "Sending due task"
    line for the drain loop it sends every second."""
    env = {"REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url}
    client = redis.Redis.from_url(settings.redis_url)
    beat = Process("beat", _beat_argv(procfile, tmp_path / "celerybeat-schedule"), env, tmp_path)
    try:
        wait_until(
            lambda: all(f"rest.plan market={m}" in beat.log() for m in ("spot", "futures")),
            30,
            f"the REST plan announced (beat log: {beat.log_path})",
        )
        # No worker runs: every drain loop beat sends stays in the ingest queue (a list of that name),
        # so three of them there prove beat has sent them, and would have logged them by then.
        wait_until(
            lambda: client.llen(QUEUE_INGEST) >= 3,
            30,
            f"three rounds of drains sent (beat log: {beat.log_path})",
        )
    finally:
        beat.stop()
        client.close()
    log = beat.log()
    assert "Sending due task" not in log, log
    assert "Traceback" not in log, log


def test_compose_beat_logs_at_info() -> None:
    """docker-compose.yml runs beat at INFO too, so its `rest.plan` lines reach `docker compose logs`."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "--loglevel=INFO" in services["beat"]["command"]
