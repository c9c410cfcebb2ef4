"""`collector services up|env|down` really starts, finds and stops a persistent Redis and PostgreSQL."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import redis

from collector.local.servers import free_port, port_open, timescaledb_installed
from collector.local.services import running_postgres, running_redis, services_command, services_config

LOCAL_VARIABLES = ("LOCAL_SERVICES", "LOCAL_DATABASE_NAME", "LOCAL_REDIS_DB")


@pytest.fixture
def ports(monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """Free ports for this test's Redis and PostgreSQL, passed the way `make run` passes them."""
    redis_port = free_port()
    postgres_port = free_port()
    while postgres_port == redis_port:
        postgres_port = free_port()
    monkeypatch.setenv("LOCAL_REDIS_PORT", str(redis_port))
    monkeypatch.setenv("LOCAL_POSTGRES_PORT", str(postgres_port))
    for name in LOCAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return redis_port, postgres_port


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """The services folder; whatever a test leaves running there is stopped afterwards."""
    path = tmp_path / "var"
    yield path
    services_command("down", str(path))


def _up(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = services_command("up", str(root))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_up_starts_persistent_servers_and_prints_their_urls(
    root: Path, ports: tuple[int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    """`up` starts Redis with an append-only file and a durable PostgreSQL, and prints both URLs."""
    redis_port, postgres_port = ports
    code, lines, err = _up(root, capsys)
    assert code == 0, err
    assert lines == [
        f"REDIS_URL=redis://127.0.0.1:{redis_port}/0",
        f"DATABASE_URL=postgresql://postgres@127.0.0.1:{postgres_port}/collector",
    ]
    assert "redis: started" in err and "postgresql: started" in err

    client = redis.Redis.from_url(lines[0].split("=", 1)[1], socket_timeout=5)
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("dir")["dir"] == str((root / "redis").resolve())
    client.close()
    conn = psycopg2.connect(f"postgresql://postgres@127.0.0.1:{postgres_port}/postgres", connect_timeout=5)
    with conn.cursor() as cur:
        cur.execute("SHOW fsync")
        assert cur.fetchone() == ("on",)
        # A machine that has TimescaleDB gets hypertables from `make run` without configuring anything.
        cur.execute("SHOW shared_preload_libraries")
        assert cur.fetchone() == ("timescaledb" if timescaledb_installed() else "",)
    conn.close()


def test_up_is_idempotent_and_env_prints_the_same_urls(
    root: Path, ports: tuple[int, int], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second `up` finds the running servers instead of starting more; `env` prints the same URLs."""
    code, first, _ = _up(root, capsys)
    assert code == 0
    pids = (running_redis(root), running_postgres(root))

    code, second, err = _up(root, capsys)
    assert code == 0
    assert second == first
    assert "redis: already running" in err and "postgresql: already running" in err
    assert (running_redis(root), running_postgres(root)) == pids

    assert services_command("env", str(root)) == 0
    assert capsys.readouterr().out.splitlines() == first

    monkeypatch.setenv("LOCAL_DATABASE_NAME", "collector_demo")
    monkeypatch.setenv("LOCAL_REDIS_DB", "1")
    assert services_command("env", str(root)) == 0
    redis_url, database_url = capsys.readouterr().out.splitlines()
    assert redis_url == first[0].removesuffix("/0") + "/1"
    assert database_url == first[1].removesuffix("/collector") + "/collector_demo"


def test_down_stops_both_and_the_data_survives_a_restart(
    root: Path, ports: tuple[int, int], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`down` stops both servers (twice is harmless); the next `up` finds the queued data and rows again."""
    redis_port, postgres_port = ports
    code, lines, _ = _up(root, capsys)
    assert code == 0
    redis_url = lines[0].split("=", 1)[1]
    admin_url = f"postgresql://postgres@127.0.0.1:{postgres_port}/postgres"
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    client.rpush("collector:test:kept", b"event")
    client.close()
    conn = psycopg2.connect(admin_url, connect_timeout=5)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE kept (id int)")
        cur.execute("INSERT INTO kept VALUES (42)")
    conn.close()

    # Through the real CLI, as `make services-down` runs it.
    result = subprocess.run(
        [sys.executable, "-m", "collector.cli", "services", "down", "--dir", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "redis: stopped" in result.stderr and "postgresql: stopped" in result.stderr
    assert running_redis(root) is None and running_postgres(root) is None
    assert not port_open(redis_port) and not port_open(postgres_port)

    assert services_command("down", str(root)) == 0
    assert "redis: not running" in capsys.readouterr().err
    assert services_command("env", str(root)) == 1
    assert "is not running" in capsys.readouterr().err

    code, again, _ = _up(root, capsys)
    assert code == 0 and again == lines
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    assert client.lrange("collector:test:kept", 0, -1) == [b"event"]
    client.close()
    conn = psycopg2.connect(admin_url, connect_timeout=5)
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM kept")
        assert cur.fetchall() == [(42,)]
    conn.close()


def test_up_refuses_a_port_taken_by_another_program(
    root: Path, ports: tuple[int, int], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port held by a stranger is reported in one line naming the variable that moves it."""
    redis_port, _ = ports
    monkeypatch.setenv("LOCAL_SERVICES", "redis")
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", redis_port))
        stranger.listen()
        code, lines, err = _up(root, capsys)
    assert code == 2
    assert lines == []
    assert err.strip().splitlines() == [
        f"collector services: redis: port {redis_port} is taken by another program; "
        "set LOCAL_REDIS_PORT to a free port"
    ]
    assert running_redis(root) is None


def test_an_up_that_fails_stops_what_it_started(
    root: Path, ports: tuple[int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    """Redis starts, then PostgreSQL's port is taken: `up` fails in one error line and stops the
    Redis it had started, rather than leaving it to outlive the failed start."""
    redis_port, postgres_port = ports
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", postgres_port))
        stranger.listen()
        code, lines, err = _up(root, capsys)
    assert code == 2 and lines == []
    assert err.strip().splitlines() == [
        f"redis: started on 127.0.0.1:{redis_port} (data in {root / 'redis'})",
        "redis: stopped again (this start failed)",
        f"collector services: postgresql: port {postgres_port} is taken by another program; "
        "set LOCAL_POSTGRES_PORT to a free port",
    ]
    assert running_redis(root) is None and not port_open(redis_port)


def test_local_services_selects_which_servers_up_handles(
    root: Path, ports: tuple[int, int], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LOCAL_SERVICES=redis starts and prints Redis only (DATABASE_URL configured elsewhere)."""
    monkeypatch.setenv("LOCAL_SERVICES", "redis")
    code, lines, _ = _up(root, capsys)
    assert code == 0
    assert lines == [f"REDIS_URL=redis://127.0.0.1:{ports[0]}/0"]
    assert running_postgres(root) is None
    assert not (root / "postgres").exists()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LOCAL_REDIS_PORT", "sixteen"), ("LOCAL_POSTGRES_PORT", "70000"), ("LOCAL_SERVICES", "mysql")],
)
def test_bad_variables_are_named_in_one_line(
    variable: str, value: str, root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad LOCAL_* value fails with exit 2 and one line naming the variable, starting nothing."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        services_config()
    assert services_command("up", str(root)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and variable in err[0]
    assert not root.exists()


def test_operator_commands_find_the_running_stack(
    tmp_path: Path, redis_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no REDIS_URL / DATABASE_URL set, `collector status` and `collector trigger` talk to the
    `make demo` stack running from ./var (its env file), and say so; without one they do not."""
    import os

    var = tmp_path / "var"
    var.mkdir()
    (var / "demo.env").write_text(f"REDIS_URL={redis_url}\nDATABASE_URL={database_url}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    collector = str(Path(sys.executable).with_name("collector"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [collector, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    (var / "demo.pid").write_text(f"{os.getpid()}\n")  # a live pid: the stack runs
    status = run("status")
    assert (
        status.stderr.splitlines()[0] == "collector: talking to the running `make demo` stack (var/demo.env)"
    )
    assert "redis       up" in status.stdout
    assert "  stack       the running `make demo` stack (var/demo.env)\n" in status.stdout
    sent = run("trigger", "drain", "--table", "agg_trades")
    assert sent.returncode == 0, sent.stderr
    assert redis.Redis.from_url(redis_url).llen("ingest") == 1  # the stack's broker got the task

    (var / "demo.pid").write_text("999999999\n")  # the stack stopped
    stopped = run("status")
    assert "talking to" not in stopped.stderr


def test_status_with_no_stack_running_says_so(tmp_path: Path) -> None:
    """After `make stop`, with nothing configured: `collector status` tries the defaults and its text
    says no stack runs and which Redis is down, with no log line on stderr."""
    import os

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 6379)) == 0:
            pytest.skip("a Redis answers on the default 127.0.0.1:6379")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "demo.env").write_text("REDIS_URL=redis://127.0.0.1:1/1\n")  # left by a stopped demo
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("collector")), "status"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stderr == ""
    lines = done.stdout.splitlines()
    no_stack = (
        "no local stack running (make run / make demo); "
        "Redis at redis://127.0.0.1:6379/0 is unreachable: Error 111 connecting to 127.0.0.1:6379."
    )
    assert lines[0] == "services" and lines[1].startswith(f"  redis       DOWN  {no_stack}")
    assert lines[-1].startswith(f"UNHEALTHY: {no_stack}")


def test_services_env_prints_the_running_stacks_urls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make services-env` while `make demo` runs prints the demo's URLs (its own database numbers)."""
    import os

    var = tmp_path / "var"
    var.mkdir()
    (var / "demo.env").write_text(
        "REDIS_URL=redis://127.0.0.1:16379/1\nDATABASE_URL=postgresql://postgres@127.0.0.1:15432/collector_demo\n"
    )
    (var / "demo.pid").write_text(f"{os.getpid()}\n")
    assert services_command("env", str(var)) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "REDIS_URL=redis://127.0.0.1:16379/1",
        "DATABASE_URL=postgresql://postgres@127.0.0.1:15432/collector_demo",
    ]
    assert "`make demo` stack" in err
