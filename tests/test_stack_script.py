"""scripts/stack.sh (`make run`, `make demo`) run for real, from a copy of it in a scratch directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from collector.db.init import init_db
from collector.localservices import free_port, running_postgres, running_redis, services_command
from collector.queue.batches import inflight_length
from collector.settings import Settings
from tests import factories
from tests.processes import BIN, TIMEOUT_FACTOR, wait_until

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent


def _stack_command(where: Path, mode: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """`scripts/stack.sh mode` copied into `where` (its var/ and Procfiles are `where`'s), and its env."""
    (where / "scripts").mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts" / "stack.sh", where / "scripts" / "stack.sh")
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


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


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
            assert running_redis(var) is not None and _port_open(redis_port)
        else:
            assert lines[0].startswith(f"redis: started on 127.0.0.1:{redis_port} ")
            assert lines[-1] == "make run: the start failed; stopped the local redis it had started"
            assert running_redis(var) is None and not _port_open(redis_port)
    finally:
        services_command("down", str(var))


def test_a_good_start_writes_the_env_file_then_starts_the_procfile(
    settings: Settings, tmp_path: Path
) -> None:
    """With good settings the env file is written in full before honcho starts the Procfile's processes."""
    (tmp_path / "Procfile").write_text(
        "probe: python -c \"import os; print('probe DEMO_VALUE=' + os.environ['DEMO_VALUE'])\"\n"
    )
    env_file = tmp_path / "var" / "run.env"
    env_file.parent.mkdir()
    env_file.write_text("stale\n")
    (tmp_path / ".env").write_text("DEMO_VALUE=from-dotenv\n")
    env = {"REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url}
    done = _stack(tmp_path, "run", env)
    assert done.returncode == 0, done.stderr
    assert "probe DEMO_VALUE=from-dotenv" in done.stdout
    assert env_file.read_text() == ""  # nothing to add: the servers are the configured ones
    assert sorted(path.name for path in env_file.parent.iterdir()) == ["run.env", "run.pid"]


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
