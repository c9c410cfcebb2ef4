"""scripts/stack.sh (`make run`, `make demo`) run for real, from a copy of it in a scratch directory."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from collector.db.init import init_db
from collector.local.servers import free_port, port_open
from collector.local.services import running_postgres, running_redis, services_command
from collector.queue.batches import inflight_length
from collector.settings import Settings
from tests import factories
from tests.processes import BIN, TIMEOUT_FACTOR, wait_until

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent


def _stack_command(where: Path, mode: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """`scripts/stack.sh mode` copied into `where` (its var/ and Procfiles are `where`'s), and its env."""
    (where / "scripts").mkdir(exist_ok=True)
    for script in ("stack.sh", "run_procfile.py"):
        shutil.copy(ROOT / "scripts" / script, where / "scripts" / script)
    hidden = {"REDIS_URL", "DATABASE_URL", "SPOT_SYMBOLS", "FUTURES_SYMBOLS"}
    base = {key: value for key, value in os.environ.items() if key not in hidden}
    return ["bash", str(where / "scripts" / "stack.sh"), mode], {**base, "VENV": str(VENV), **env}


def _stack(where: Path, mode: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `scripts/stack.sh mode` in `where` to its end."""
    argv, full_env = _stack_command(where, mode, env)
    return subprocess.run(argv, cwd=where, env=full_env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", ["run", "demo"])
def test_a_start_with_a_bad_setting_leaves_the_env_file_as_it_was(
    mode: str, settings: Settings, tmp_path: Path
) -> None:
    """`SPOT_SYMBOLS=BTC/USDT make demo` (or run) fails with one line naming the variable, and the
    stack's env file from the last good start is untouched, with no scratch file left beside it."""
    var = tmp_path / "var"
    var.mkdir()
    env_file = var / f"{mode}.env"
    env_file.write_text("REDIS_URL=redis://127.0.0.1:16379/1\n")
    env = {"SPOT_SYMBOLS": "BTC/USDT"}
    if mode == "run":  # the servers of the test: `make run` starts none of its own
        env |= {"REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url}
    done = _stack(tmp_path, mode, env)
    assert done.returncode != 0
    assert "SPOT_SYMBOLS" in done.stderr
    assert env_file.read_text() == "REDIS_URL=redis://127.0.0.1:16379/1\n"
    assert sorted(path.name for path in var.iterdir()) == [env_file.name]


@pytest.mark.parametrize("redis_already_ran", [False, True], ids=["redis-started", "redis-was-running"])
def test_a_failed_start_stops_the_local_servers_it_started(
    tmp_path: Path, redis_already_ran: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run` with REDIS_URL unset and a DATABASE_URL that cannot be reached: it starts a local
    Redis, init-db fails, and that Redis is stopped again (one line says so); a Redis that already
    ran before the start (another stack's) is left running."""
    var = tmp_path / "var"
    redis_port = free_port()
    database_url = f"postgresql://postgres:wrong@127.0.0.1:{free_port()}/collector"  # nothing listens
    env = {"DATABASE_URL": database_url, "LOCAL_REDIS_PORT": str(redis_port)}
    monkeypatch.setenv("LOCAL_REDIS_PORT", str(redis_port))
    monkeypatch.setenv("LOCAL_SERVICES", "redis")
    try:
        if redis_already_ran:  # as `make services-up` (or a running `make demo`) leaves it
            assert services_command("up", str(var)) == 0
        done = _stack(tmp_path, "run", env)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr, done.stderr
        lines = done.stderr.splitlines()
        assert any(line.startswith("collector: PostgreSQL at ") for line in lines), done.stderr
        assert running_postgres(var) is None
        if redis_already_ran:
            assert lines[0].startswith("redis: already running on ")
            assert "stopped" not in done.stderr
            assert running_redis(var) is not None and port_open(redis_port)
        else:
            assert lines[0].startswith(f"redis: started on 127.0.0.1:{redis_port} ")
            assert lines[-1] == "make run: the start failed; stopped the local redis it had started"
            assert running_redis(var) is None and not port_open(redis_port)
    finally:
        services_command("down", str(var))


_HONCHO_LINE = re.compile(r"^\d\d:\d\d:\d\d (\S+?)\s*\| (.*)$")  # `12:00:00 streams.1 | text`


def _terminal_lines(output: str, process: str) -> list[str]:
    """The lines honcho printed for `process` (`streams.1`, `system`), without its prefix."""
    found = (_HONCHO_LINE.match(line) for line in output.splitlines())
    return [match.group(2) for match in found if match and match.group(1) == process]


def _logged_lines(log_dir: Path, name: str) -> list[str]:
    """The lines of `name`.log and its rotated files, oldest first."""
    paths = sorted(log_dir.glob(f"{name}.log.*"), key=lambda path: -int(path.suffix[1:]))
    return [line for path in [*paths, log_dir / f"{name}.log"] for line in path.read_text().splitlines()]


def test_ctrl_c_during_the_start_stops_the_local_servers_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while init-db waits for a database that never answers: the Redis this start started
    is stopped again, with one line saying the start was interrupted, and the exit is 130."""
    redis_port = free_port()
    with socket.socket() as silent:  # accepts connections into its backlog, never answers them
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        database_url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/collector"
        env = {"DATABASE_URL": database_url, "LOCAL_REDIS_PORT": str(redis_port)}
        argv, full_env = _stack_command(tmp_path, "run", env)
        stack = subprocess.Popen(
            argv, cwd=tmp_path, env=full_env, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            silent.settimeout(60 * TIMEOUT_FACTOR)
            waiting, _ = silent.accept()  # init-db has connected and waits for the server's answer
            os.killpg(stack.pid, signal.SIGINT)  # what Ctrl-C sends the terminal's foreground group
            _, err = stack.communicate(timeout=60 * TIMEOUT_FACTOR)
            waiting.close()
        finally:
            if stack.poll() is None:
                os.killpg(stack.pid, signal.SIGKILL)
                stack.wait()
            monkeypatch.setenv("LOCAL_SERVICES", "redis")
            services_command("down", str(tmp_path / "var"))
    assert stack.returncode == 130, err
    assert (
        err.splitlines()[-1] == "make run: the start was interrupted; stopped the local redis it had started"
    )
    assert running_redis(tmp_path / "var") is None and not port_open(redis_port)


def test_a_good_start_writes_the_env_file_then_starts_the_procfile(
    settings: Settings, tmp_path: Path
) -> None:
    """With good settings the env file is written in full before honcho starts the Procfile's processes;
    each process's output reaches the terminal and var/log/<process>.log, rotated at the size asked."""
    (tmp_path / "Procfile").write_text(
        "probe: python -c \"import os; print('probe DEMO_VALUE=' + os.environ['DEMO_VALUE']); "
        "[print(f'line {i:03d} of the probe') for i in range(60)]\"\n"
    )
    env_file = tmp_path / "var" / "run.env"
    env_file.parent.mkdir()
    env_file.write_text("stale\n")
    (tmp_path / ".env").write_text("DEMO_VALUE=from-dotenv\n")
    env = {"REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url}
    max_bytes, backups = 300, 2
    env |= {"STACK_LOG_MAX_BYTES": str(max_bytes), "STACK_LOG_BACKUPS": str(backups)}
    done = _stack(tmp_path, "run", env)
    assert done.returncode == 0, done.stderr
    assert "probe DEMO_VALUE=from-dotenv" in done.stdout
    assert env_file.read_text() == ""  # nothing to add: the servers are the configured ones
    assert sorted(path.name for path in env_file.parent.iterdir()) == ["log", "run.env", "run.pid"]

    logs = tmp_path / "var" / "log"
    names = ["probe.log", *(f"probe.log.{n}" for n in range(1, backups + 1))]
    assert sorted(path.name for path in logs.iterdir()) == sorted(["honcho.log", *names])
    assert all((logs / name).stat().st_size <= max_bytes for name in names)
    printed = _terminal_lines(done.stdout, "probe.1")
    assert printed[0] == "probe DEMO_VALUE=from-dotenv" and len(printed) == 61
    kept = _logged_lines(logs, "probe")
    assert kept == printed[-len(kept) :] and len(kept) > 10  # the newest lines, none cut or lost
    honcho_lines = (logs / "honcho.log").read_text().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d probe\.1 started \(pid=\d+\)", honcho_lines[0])


def test_demo_keeps_its_logs_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo` writes its processes' logs under var/log/demo/, apart from a live run's var/log/."""
    (tmp_path / "Procfile.demo").write_text("probe: python -c \"print('demo probe')\"\n")
    ports = {"LOCAL_REDIS_PORT": str(free_port()), "LOCAL_POSTGRES_PORT": str(free_port())}
    for name, value in ports.items():
        monkeypatch.setenv(name, value)
    try:
        done = _stack(tmp_path, "demo", ports)
        assert done.returncode == 0, done.stderr
    finally:
        services_command("down", str(tmp_path / "var"))
    logs = tmp_path / "var" / "log"
    assert sorted(path.name for path in logs.iterdir()) == ["demo"]
    assert (logs / "demo" / "probe.log").read_text() == "demo probe\n"
    assert "logs: var/log/demo/<process>.log" in done.stderr


def test_make_stop_lets_the_running_drain_finish(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """`make run` then `make stop` (honcho signals each process's whole group): worker-ingest, started
    from the Procfile's own line, finishes its running drain and stops with no error."""
    init_db(settings)
    worker_line = next(
        line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("worker-ingest:")
    )
    (tmp_path / "Procfile").write_text(worker_line + "\n")
    total = 200_000
    factories.queue_agg_trades(redis_conn, total)
    env = {
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "DRAIN_BATCH_MAX_ROWS": "1000",
        "DRAIN_RUN_MAX_S": str(4 * TIMEOUT_FACTOR),  # still running when make stop comes
    }
    argv, full_env = _stack_command(tmp_path, "run", env)
    output = tmp_path / "stack.log"
    with output.open("wb") as sink:
        stack = subprocess.Popen(argv, cwd=tmp_path, env=full_env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: " ready." in output.read_text(), 60, f"the worker ready ({output})")
        collector = str(BIN / "collector")
        subprocess.run(
            [collector, "trigger", "drain", "--table", "agg_trades"],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(
            lambda: factories.stored_agg_trades(settings.database_url) > 0, 60, f"the first rows ({output})"
        )
        at_stop = factories.stored_agg_trades(settings.database_url)
        stop_argv, stop_env = _stack_command(tmp_path, "stop", env)
        stop = subprocess.Popen(stop_argv, cwd=tmp_path, env=stop_env, stderr=subprocess.PIPE, text=True)
        code = stack.wait(timeout=60)  # reaped here, as make reaps it: `stop` polls until it is gone
        _, stop_err = stop.communicate(timeout=60)
        assert stop.returncode == 0, stop_err
    finally:
        if stack.poll() is None:
            stack.kill()
            stack.wait()
    log = output.read_text()
    assert code in (0, 143), log  # 143: honcho ended by SIGTERM, which make treats as a clean stop
    for bad in ("WorkerLostError", "ERROR", "Traceback", "exited with 'signal", "Restoring"):
        assert bad not in log, f"{bad!r} in the stack's output:\n{log}"
    assert factories.stored_agg_trades(settings.database_url) > at_stop, (
        "the drain stopped at make stop instead of finishing its run"
    )
    assert inflight_length(redis_conn, "agg_trades") == 0
    # Every line the worker printed, its shutdown included, is in its log file after make stop.
    logs = tmp_path / "var" / "log"
    printed = _terminal_lines(log, "worker-ingest.1")
    assert any(" ready." in line for line in printed) and any("Warm shutdown" in line for line in printed)
    assert _logged_lines(logs, "worker-ingest") == printed
    assert " worker-ingest.1 stopped (rc=" in _logged_lines(logs, "honcho")[-1]
