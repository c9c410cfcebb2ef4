"""Real servers for the tests: a throwaway Redis and PostgreSQL on free ports, stopped at the end.

Each test gets an empty Redis database (FLUSHALL) and a fresh PostgreSQL database of its own.
The PostgreSQL server preloads TimescaleDB whenever this machine has the extension installed, as
`make run` does, so the whole suite runs on hypertables there; tests of the plain-PostgreSQL path ask
for `TIMESCALE=off` (the `settings_each_mode` fixture runs a test in both modes). A second server that has
the extension installed but not preloaded is started only for the tests that need it.
`TIMEOUT_FACTOR` (env) scales every waiting deadline, as websockets' test suite does.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis

from collector.fake.server import FakeExchange
from collector.local.servers import LocalService, start_postgres, start_redis, timescaledb_installed
from collector.settings import Settings, load_settings

TIMEOUT_FACTOR = float(os.environ.get("TIMEOUT_FACTOR", "1"))
_db_counter = itertools.count()

TIMESCALEDB_INSTALLED = timescaledb_installed()
_NOT_INSTALLED = (
    "TimescaleDB is not installed on this machine's PostgreSQL (../shared/timescaledb/install.sh)"
)
# `timescaledb` / `plain_postgres` mark the tests of each path; the run ends with a tally of both.
plain_postgres = pytest.mark.plain_postgres


def requires_timescaledb(test: Callable[..., None]) -> Callable[..., None]:
    """A TimescaleDB test: skipped, with the reason, only where the extension is not installed."""
    return pytest.mark.timescaledb(pytest.mark.skipif(not TIMESCALEDB_INSTALLED, reason=_NOT_INSTALLED)(test))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per database path, so CI's output shows the TimescaleDB tests ran (or why not)."""
    for marker, label in (
        ("timescaledb", "TimescaleDB"),
        ("plain_postgres", "plain PostgreSQL (TIMESCALE=off)"),
    ):
        outcomes: Counter[str] = Counter()
        for reports in terminalreporter.stats.values():
            for report in reports:
                if (
                    isinstance(report, pytest.TestReport)
                    and report.keywords.get(marker)
                    and (report.when == "call" or report.outcome != "passed")
                ):
                    outcomes[report.outcome] += 1
        summary = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items())) or "none ran"
        terminalreporter.write_line(f"{label} tests: {summary}")


@pytest.fixture(scope="session")
def services_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="collector-tests-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(services_dir: Path) -> Iterator[LocalService]:
    server = start_redis(services_dir / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server(services_dir: Path) -> Iterator[LocalService]:
    server = start_postgres(services_dir / "pg", durable=False)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: LocalService) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def unpreloaded_postgres_server(services_dir: Path) -> Iterator[LocalService]:
    """A server where TimescaleDB is installed but not preloaded: the state right after installing it."""
    if not TIMESCALEDB_INSTALLED:
        pytest.skip("TimescaleDB is not installed on this machine's PostgreSQL")
    server = start_postgres(services_dir / "pg-unpreloaded", durable=False, timescaledb=False)
    yield server
    server.stop()


def _throwaway_database(server: LocalService) -> Iterator[str]:
    name = f"collector_test_{os.getpid()}_{next(_db_counter)}"
    yield f"postgresql://postgres@127.0.0.1:{server.port}/{name}"
    admin = psycopg2.connect(f"postgresql://postgres@127.0.0.1:{server.port}/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def database_url(postgres_server: LocalService) -> Iterator[str]:
    """URL of a database that does not exist yet: the code under test creates it."""
    yield from _throwaway_database(postgres_server)


@pytest.fixture
def unpreloaded_database_url(unpreloaded_postgres_server: LocalService) -> Iterator[str]:
    yield from _throwaway_database(unpreloaded_postgres_server)


@pytest.fixture(
    params=[pytest.param("require", marks=pytest.mark.timescaledb), pytest.param("off", marks=plain_postgres)]
)
def settings_each_mode(
    request: pytest.FixtureRequest, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """`settings` with TIMESCALE=require (hypertables; skipped where TimescaleDB is absent) and with
    TIMESCALE=off (plain tables): a test that takes this fixture runs on both."""
    if request.param == "require" and not TIMESCALEDB_INSTALLED:
        pytest.skip(_NOT_INSTALLED)
    monkeypatch.setenv("TIMESCALE", request.param)
    return settings.model_copy(update={"timescale": request.param})


FakeFactory = Callable[..., FakeExchange]


@pytest.fixture
def make_fake() -> Iterator[FakeFactory]:
    """Start fake exchanges with any options; every one started is stopped after the test."""
    started: list[FakeExchange] = []

    def make(**kwargs: Any) -> FakeExchange:
        fake = FakeExchange(**kwargs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def settings(redis_url: str, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings pointing at the test servers; also exported to the environment for subprocesses."""
    env = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "ALERT_LOG": str(tmp_path / "alert.log"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # keep a developer's .env out of the tests
    return load_settings()


@pytest.fixture
def redis_conn(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def db(settings: Settings) -> Iterator[psycopg2.extensions.connection]:
    """The test's database with the schema, on a connection in autocommit."""
    from collector.db.connection import connect
    from collector.db.init import init_db

    init_db(settings)
    conn = connect(settings, autocommit=True)
    yield conn
    conn.close()
