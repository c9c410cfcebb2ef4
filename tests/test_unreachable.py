"""Every entry point with Redis, PostgreSQL or both unreachable: one line naming each service it needs
(its URL without the password, what to do) and a non-zero exit; an entry point that does not need the
service that is down simply works. Real commands, real servers, closed local ports.

The table below is the contract (`collector.preflight` documents why each needs what it needs):

- one-shot commands and `celery worker|beat` refuse at start with exactly one line on stderr, nothing
  on stdout, exit 2, within the subprocess timeout (no retry loop);
- `collector web` keeps serving (a health endpoint is where an operator learns a service is down): one
  warning line per service before `web.listening`, and /health answers 503 naming it;
- `collector status` reports it: UNHEALTHY naming it, exit 1, nothing on stderr.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import redis

from collector.db.init import init_db
from collector.local.servers import port_open
from collector.queue import keys
from collector.settings import load_settings
from tests.conftest import TIMEOUT_FACTOR, FakeFactory
from tests.processes import BIN, Process, wait_until

PASSWORD = "pw-never-shown-7f3a"
HINTS = {"redis": "(start Redis, or set REDIS_URL)", "postgresql": "(start PostgreSQL, or set DATABASE_URL)"}
DOWN_CASES = {
    "redis down": ("redis",),
    "postgresql down": ("postgresql",),
    "both down": ("redis", "postgresql"),
}


def closed_port() -> int:
    """A local port nothing listens on: bound for a moment to get it, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class World:
    """The URLs one case runs with (a down service on a closed port, with a password in its URL)."""

    tmp_path: Path
    env: dict[str, str]
    named: dict[str, str]  # service -> what the line must show: "Redis at <URL without password>"
    up_redis_url: str
    make_fake: FakeFactory

    def run(self, *argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / argv[0]), *argv[1:]],
            env={**self.env, **extra},
            cwd=self.tmp_path,
            capture_output=True,
            text=True,
            timeout=60 * TIMEOUT_FACTOR,
        )

    def start(self, name: str, *argv: str, **extra: str) -> Process:
        return Process(name, [str(BIN / argv[0]), *argv[1:]], {**self.env, **extra}, self.tmp_path)

    def init_database(self) -> None:
        """Create the schema in the database that is up (commands that read tables need it)."""
        init_db(load_settings(database_url=self.env["DATABASE_URL"], timescale="off"))


@dataclass(frozen=True)
class Entry:
    argv: tuple[str, ...]
    needs: tuple[str, ...]  # refuses at start when one of these is down
    works: Callable[[World, tuple[str, ...]], None]  # what it does when what it needs is up


def _stopped_cleanly(process: Process) -> str:
    process.stop()
    log = process.log()
    assert "Traceback" not in log and PASSWORD not in log, log
    return log


def _exits_0(
    *argv: str, prepare: Callable[[World], None] | None = None
) -> Callable[[World, tuple[str, ...]], None]:
    def works(world: World, _: tuple[str, ...]) -> None:
        if prepare is not None:
            prepare(world)
        done = world.run(*argv)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert PASSWORD not in done.stdout + done.stderr

    return works


def _listens(name: str, *argv: str, port_variable: str = "") -> Callable[[World, tuple[str, ...]], None]:
    def works(world: World, _: tuple[str, ...]) -> None:
        port = closed_port()
        args = [a.replace("{port}", str(port)) for a in argv]
        process = world.start(name, *args, **({port_variable: str(port)} if port_variable else {}))
        try:
            wait_until(lambda: port_open(port) or process.popen.poll() is not None, 60, f"{name} listening")
            assert process.popen.poll() is None, process.log()
        finally:
            _stopped_cleanly(process)

    return works


def _streams_record(world: World, _: tuple[str, ...]) -> None:
    fake = world.make_fake()
    process = world.start(
        "streams",
        "collector",
        "streams",
        BINANCE_SPOT_WS_URL=fake.spot_ws_url,
        BINANCE_FUTURES_WS_URL=fake.futures_ws_url,
        BINANCE_SPOT_REST_URL=fake.spot_rest_url,
        BINANCE_FUTURES_REST_URL=fake.futures_rest_url,
        SPOT_STREAMS="aggTrade",
        FUTURES_STREAMS="aggTrade",
    )
    client = redis.Redis.from_url(world.up_redis_url)
    try:
        wait_until(lambda: client.llen(keys.queue("agg_trades")), 60, "trades queued in Redis")
    finally:
        client.close()
        _stopped_cleanly(process)


def _worker_ready(world: World, _: tuple[str, ...]) -> None:
    process = world.start(
        "worker", "celery", "-A", "collector", "worker", "-Q", "rest", "--concurrency=1", "--loglevel=INFO"
    )
    try:
        wait_until(lambda: " ready." in process.log() or process.popen.poll() is not None, 60, "worker ready")
        assert process.popen.poll() is None, process.log()
    finally:
        _stopped_cleanly(process)


def _beat_sends(world: World, _: tuple[str, ...]) -> None:
    process = world.start(
        "beat", "celery", "-A", "collector", "beat", "--schedule", str(world.tmp_path / "beat-schedule")
    )
    client = redis.Redis.from_url(world.up_redis_url)
    try:
        wait_until(lambda: client.llen("ingest"), 60, "a drain task sent to the ingest queue")
    finally:
        client.close()
        _stopped_cleanly(process)


def _seed_snapshot(world: World) -> None:
    world.init_database()
    book = {"lastUpdateId": 7, "bids": [["100.0", "1.5"]], "asks": [["101.0", "2.0"]]}
    conn = psycopg2.connect(world.env["DATABASE_URL"])
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO depth_snapshots (time, symbol, market_type, last_update_id, payload)"
            " VALUES ('2026-01-01T00:00:00Z', 'BTCUSDT', 'spot', 7, %s)",
            (json.dumps(book),),
        )
    conn.close()


def _web_reports(world: World, down: tuple[str, ...]) -> None:
    """Serves; one warning per service down before `web.listening`, naming it and its URL; /health
    answers 503 with the reason for each, and none for the service that is up."""
    if "postgresql" not in down:
        world.init_database()
    port = closed_port()
    process = world.start("web", "collector", "web", WEB_PORT=str(port), WEB_HOST="127.0.0.1")
    try:

        def health() -> tuple[int, str] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
                    return answer.status, answer.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, error.read().decode()
            except OSError:
                assert process.popen.poll() is None, process.log()
                return None

        status, body = wait_until(health, 60, "/health answering")  # type: ignore[misc]
        reasons = json.loads(body)["reasons"]  # the services first, then what follows from them
        assert status == 503 and all(
            HINTS[service] in reason for service, reason in zip(down, reasons, strict=False)
        ), body
        assert not any(HINTS[service] in body for service in HINTS if service not in down), body
    finally:
        log = _stopped_cleanly(process)
    lines = log.splitlines()
    before = lines[: next(i for i, line in enumerate(lines) if "web.listening" in line)]
    assert len(before) == len(down), log
    for line, service in zip(before, down, strict=True):
        assert "WARNING" in line and world.named[service] in line and HINTS[service] in line, line


def _status_reports(world: World, down: tuple[str, ...]) -> None:
    """Reports each service down in its text: UNHEALTHY naming it, exit 1, nothing on stderr."""
    done = world.run("collector", "status")
    assert (done.returncode, done.stderr) == (1, ""), done.stderr
    verdict = done.stdout.splitlines()[-1]
    assert verdict.startswith("UNHEALTHY: ") and PASSWORD not in done.stdout
    assert all(world.named[service] in verdict and HINTS[service] in verdict for service in down), verdict


ENTRIES: dict[str, Entry] = {
    "streams": Entry(("collector", "streams"), ("redis",), _streams_record),
    "web": Entry(("collector", "web"), (), _web_reports),
    "flower": Entry(
        ("collector", "flower"),
        ("redis",),
        _listens("flower", "collector", "flower", port_variable="FLOWER_PORT"),
    ),
    "init-db": Entry(("collector", "init-db"), ("postgresql",), _exits_0("collector", "init-db")),
    "status": Entry(("collector", "status"), (), _status_reports),
    "trigger": Entry(
        ("collector", "trigger", "alerts"), ("redis",), _exits_0("collector", "trigger", "alerts")
    ),
    "fake-exchange": Entry(
        ("collector", "fake-exchange"), (), _listens("fake", "collector", "fake-exchange", "--port", "{port}")
    ),
    "services": Entry(
        ("collector", "services"), (), _exits_0("collector", "services", "down", "--dir", "var")
    ),
    "gaps": Entry(
        ("collector", "gaps"), ("postgresql",), _exits_0("collector", "gaps", prepare=World.init_database)
    ),
    "audit": Entry(("collector", "audit"), ("redis", "postgresql"), _exits_0("collector", "audit")),
    "export": Entry(
        ("collector", "export", "agg_trades"),
        ("postgresql",),
        _exits_0("collector", "export", "agg_trades", prepare=World.init_database),
    ),
    "book": Entry(
        ("collector", "book", "spot", "BTCUSDT", "--at", "2026-01-01T00:00:00"),
        ("postgresql",),
        _exits_0(
            "collector", "book", "spot", "BTCUSDT", "--at", "2026-01-01T00:00:00", prepare=_seed_snapshot
        ),
    ),
    "celery worker": Entry(("celery", "-A", "collector", "worker"), ("redis", "postgresql"), _worker_ready),
    "celery worker -Q rest": Entry(
        ("celery", "-A", "collector", "worker", "-Q", "rest"), ("redis",), _worker_ready
    ),
    "celery beat": Entry(("celery", "-A", "collector", "beat"), ("redis",), _beat_sends),
}


def test_the_table_covers_every_collector_command() -> None:
    """Every sub-command `collector --help` lists has a row in the table."""
    from collector.cli import COMMANDS

    assert set(COMMANDS) <= {name.split()[0] for name in ENTRIES}


@pytest.mark.parametrize("case", DOWN_CASES)
@pytest.mark.parametrize("name", ENTRIES)
def test_an_unreachable_service_is_one_line_or_the_command_works(
    name: str, case: str, tmp_path: Path, redis_url: str, database_url: str, make_fake: FakeFactory
) -> None:
    """With a service down, an entry point that needs it refuses at start in one line naming it, its URL
    without the password and what to do (exit 2); one that does not need it works."""
    down = DOWN_CASES[case]
    port = closed_port()
    urls = {
        "redis": f"redis://:{PASSWORD}@127.0.0.1:{port}/0" if "redis" in down else redis_url,
        "postgresql": f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/collector"
        if "postgresql" in down
        else database_url,
    }
    named = {
        "redis": "Redis at " + urls["redis"].replace(PASSWORD, "***"),
        "postgresql": "PostgreSQL at " + urls["postgresql"].replace(PASSWORD, "***"),
    }
    # Only what the commands need: no developer's REDIS_URL, .env (cwd is empty) or credentials.
    env = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "HOME", "LANG") if k in os.environ}
    env |= {"REDIS_URL": urls["redis"], "DATABASE_URL": urls["postgresql"], "TIMESCALE": "off"}
    world = World(tmp_path, env, named, redis_url, make_fake)
    entry = ENTRIES[name]
    refused = [service for service in entry.needs if service in down]
    if not refused:
        entry.works(world, down)
        return
    done = world.run(*entry.argv)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"collector: {named[refused[0]]} "), lines[0]
    for service in refused:
        assert named[service] in lines[0] and HINTS[service] in lines[0], lines[0]
    for service in set(down) - set(refused):  # it does not touch what it does not need
        assert named[service] not in lines[0], lines[0]
    assert PASSWORD not in done.stderr


@pytest.mark.parametrize(
    ("argv", "services"),
    [
        (("gaps",), ("postgresql",)),
        (("audit",), ("redis", "postgresql")),
        (("export", "agg_trades"), ("postgresql",)),
        (("book", "spot", "BTCUSDT", "--at", "2026-01-01"), ("postgresql",)),
        (("trigger", "alerts"), ("redis",)),
    ],
)
def test_operator_commands_say_no_local_stack_runs(
    tmp_path: Path, argv: tuple[str, ...], services: tuple[str, ...]
) -> None:
    """Nothing configured and no `make run` / `make demo` stack running: an operator command tries the
    defaults and its one line starts by saying no local stack runs (as `collector status` does)."""
    defaults = {"redis": ("Redis at redis://127.0.0.1:6379/0", 6379)}
    defaults["postgresql"] = ("PostgreSQL at postgresql://postgres@127.0.0.1:5432/collector", 5432)
    if any(port_open(port) for _, port in defaults.values()):
        pytest.skip("a Redis or PostgreSQL answers on its default port here")
    (tmp_path / "var").mkdir()
    done = _collector(tmp_path, argv)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith(
        f"collector: no local stack running (make run / make demo); {defaults[services[0]][0]} is unreachable"
    ), done.stderr
    assert len(done.stderr.splitlines()) == 1 and all(
        defaults[service][0] in done.stderr and HINTS[service] in done.stderr for service in services
    ), done.stderr


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (("gaps", "--since", "yesterday"), "--since"),
        (("audit", "--since", "yesterday"), "--since"),
        (("export", "nosuch"), "cannot export 'nosuch'"),
        (("export", "agg_trades", "--from", "yesterday"), "--from"),
        (("book", "spot", "BTCUSDT", "--at", "yesterday"), "yesterday"),
        (("trigger", "alerts", "--symbol", "BTCUSDT"), "--symbol"),
    ],
)
def test_a_bad_argument_is_named_before_a_service_that_is_down(
    tmp_path: Path, argv: tuple[str, ...], named: str
) -> None:
    """Both services down and a bad argument: the one line names the argument (what the operator typed
    wrong is fixed first), not the services the command never got to try."""
    port = closed_port()
    done = _collector(
        tmp_path,
        argv,
        REDIS_URL=f"redis://127.0.0.1:{port}/0",
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/collector",
    )
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert len(done.stderr.splitlines()) == 1 and named in done.stderr, done.stderr
    assert "unreachable" not in done.stderr, done.stderr


def _collector(cwd: Path, argv: tuple[str, ...], **env: str) -> subprocess.CompletedProcess[str]:
    """`collector ARGV` in `cwd` with only what it needs of this environment (no developer's .env,
    REDIS_URL or credentials) plus `env`."""
    kept = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(
        [str(BIN / "collector"), *argv],
        env=kept | env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_FACTOR,
    )
