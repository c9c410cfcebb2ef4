"""`collector services up|down|env`: a private, persistent Redis and PostgreSQL for `make run`.

A tool for running the collector on one machine without docker (`make run`, `make services-up`);
docker-compose runs its own. Used only when REDIS_URL / DATABASE_URL are not configured.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from collector.local.servers import START_TIMEOUT_S, LocalService, port_open, start_postgres, wait_for_port
from collector.local.stack import pid_alive, pid_from_file, running_stack

logger = logging.getLogger(__name__)

# Unlike the throwaway servers of `collector.local.servers`, these outlive the command that starts
# them (Redis daemonizes, `pg_ctl` detaches the postmaster), keep their data under `<dir>/redis` and
# `<dir>/postgres`, and are found again through their pid files, so `up` is idempotent and `down`
# works from any shell.

# Off the system defaults (6379/5432) so a Redis or PostgreSQL installed as a system service
# does not clash with ours.
DEFAULT_REDIS_PORT = 16379
DEFAULT_POSTGRES_PORT = 15432
DEFAULT_DATABASE_NAME = "collector"
SERVICE_NAMES = ("redis", "postgresql")
DATA_DIRS = {"redis": "redis", "postgresql": "postgres"}  # below the services folder
STOP_TIMEOUT_S = 30
_STATE_FILE = "services.json"


@dataclass(frozen=True)
class ServicesConfig:
    """What `collector services` reads from the environment (all optional)."""

    redis_port: int = DEFAULT_REDIS_PORT  # LOCAL_REDIS_PORT
    postgres_port: int = DEFAULT_POSTGRES_PORT  # LOCAL_POSTGRES_PORT
    database_name: str = DEFAULT_DATABASE_NAME  # LOCAL_DATABASE_NAME: the name put in DATABASE_URL
    redis_db: int = 0  # LOCAL_REDIS_DB: the database number put in REDIS_URL
    services: tuple[str, ...] = SERVICE_NAMES  # LOCAL_SERVICES: which ones `up` and `env` handle


def services_config(environ: dict[str, str] | None = None) -> ServicesConfig:
    """Read the LOCAL_* variables; `ValueError` with one line naming the bad one."""
    env = dict(os.environ if environ is None else environ)

    def number(name: str, default: int, low: int, high: int) -> int:
        raw = env.get(name, "").strip()
        if not raw:
            return default
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise ValueError(f"{name}: expected a number from {low} to {high} (got {raw!r})")
        return int(raw)

    database_name = env.get("LOCAL_DATABASE_NAME", "").strip() or DEFAULT_DATABASE_NAME
    if not database_name.replace("_", "").isalnum():
        raise ValueError(f"LOCAL_DATABASE_NAME: letters, digits and _ only (got {database_name!r})")
    listed = env.get("LOCAL_SERVICES", ",".join(SERVICE_NAMES)).split(",")
    services = tuple(name.strip() for name in listed if name.strip())
    if not services or any(name not in SERVICE_NAMES for name in services):
        choices = ",".join(SERVICE_NAMES)
        raise ValueError(f"LOCAL_SERVICES: a comma-separated subset of {choices} (got {services})")
    return ServicesConfig(
        redis_port=number("LOCAL_REDIS_PORT", DEFAULT_REDIS_PORT, 1, 65535),
        postgres_port=number("LOCAL_POSTGRES_PORT", DEFAULT_POSTGRES_PORT, 1, 65535),
        database_name=database_name,
        redis_db=number("LOCAL_REDIS_DB", 0, 0, 15),
        services=services,
    )


def _read_state(root: Path) -> dict[str, int]:
    try:
        data = json.loads((root / _STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {key: int(value) for key, value in data.items() if isinstance(value, int)}


def _write_state(root: Path, **ports: int) -> None:
    state = _read_state(root)
    state.update(ports)
    (root / _STATE_FILE).write_text(json.dumps(state, sort_keys=True) + "\n")


def running_redis(root: Path) -> tuple[int, int] | None:
    """(pid, port) of the Redis started under `root`, or None when it does not run."""
    pid = pid_from_file(root / DATA_DIRS["redis"] / "redis.pid")
    port = _read_state(root).get("redis_port")
    if pid is None or port is None or not pid_alive(pid):
        return None
    return pid, port


def running_postgres(root: Path) -> tuple[int, int] | None:
    """(pid, port) of the PostgreSQL whose cluster is `root/postgres`, from its postmaster.pid."""
    try:
        lines = (root / DATA_DIRS["postgresql"] / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    # postmaster.pid: line 1 the pid, line 4 the port (PostgreSQL docs, "Database File Layout").
    if len(lines) < 4 or not lines[0].strip().isdigit() or not lines[3].strip().isdigit():
        return None
    pid, port = int(lines[0]), int(lines[3])
    return (pid, port) if pid_alive(pid) else None


def _redis_url(port: int, config: ServicesConfig) -> str:
    return f"redis://127.0.0.1:{port}/{config.redis_db}"


def _database_url(port: int, config: ServicesConfig) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/{config.database_name}"


def _refuse_taken_port(name: str, port: int, variable: str) -> None:
    if port_open(port):
        raise RuntimeError(f"{name}: port {port} is taken by another program; set {variable} to a free port")


def _redis_up(root: Path, config: ServicesConfig) -> tuple[int, bool]:
    """Start the persistent Redis unless it runs; (port, started)."""
    running = running_redis(root)
    if running is not None:
        return running[1], False
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis: redis-server is not installed (apt-get install -y redis-server)")
    port = config.redis_port
    _refuse_taken_port("redis", port, "LOCAL_REDIS_PORT")
    data_dir = (root / DATA_DIRS["redis"]).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # The queues are the only copy of data not yet drained: append-only file, fsync every second
    # (Redis persistence docs: at most one second of writes lost on a power failure).
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir)]
    args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    args += ["--daemonize", "yes", "--pidfile", str(data_dir / "redis.pid")]
    args += ["--logfile", str(data_dir / "redis.log")]
    subprocess.run(args, check=True, capture_output=True, timeout=START_TIMEOUT_S)
    _write_state(root, redis_port=port)
    wait_for_port(port)
    # Redis writes its pid file only after it listens (server.c: createPidFile after initServer).
    deadline = time.monotonic() + START_TIMEOUT_S
    while running_redis(root) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis: no live pid in {data_dir / 'redis.pid'} after {START_TIMEOUT_S}s")
        time.sleep(0.02)
    return port, True


def _failure_reason(error: subprocess.CalledProcessError, data_dir: Path) -> str:
    """The server's own FATAL line when there is one, else what the failed command printed."""
    log = data_dir / "postgres.log"
    try:
        fatal = [line for line in log.read_text(errors="replace").splitlines() if "FATAL" in line]
    except OSError:
        fatal = []
    if fatal:
        return f"{fatal[-1].split('FATAL:', 1)[-1].strip()} (log: {log})"
    output = (error.stderr or b"").decode(errors="replace").strip().splitlines()
    return output[-1] if output else f"exit {error.returncode}"


def _postgres_up(root: Path, config: ServicesConfig) -> tuple[int, bool]:
    """Start the durable PostgreSQL unless it runs; (port, started)."""
    running = running_postgres(root)
    if running is not None:
        return running[1], False
    port = config.postgres_port
    _refuse_taken_port("postgresql", port, "LOCAL_POSTGRES_PORT")
    data_dir = (root / DATA_DIRS["postgresql"]).resolve()  # `-k` and `-l` need absolute paths
    try:
        start_postgres(data_dir, port, durable=True)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"postgresql: did not start: {_failure_reason(error, data_dir)}") from None
    _write_state(root, postgres_port=port)
    return port, True


def _redis_down(root: Path) -> bool:
    running = running_redis(root)
    if running is None:
        return False
    pid = running[0]
    # SIGTERM makes Redis flush and fsync the append-only file before it exits.
    os.kill(pid, 15)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        logger.warning("services.redis_kill pid=%s reason=no exit after %ss", pid, STOP_TIMEOUT_S)
        os.kill(pid, 9)
    return True


def _postgres_down(root: Path) -> bool:
    running = running_postgres(root)
    if running is None:
        return False
    data_dir = (root / DATA_DIRS["postgresql"]).resolve()
    LocalService("postgresql", "", running[1], data_dir).stop()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while running_postgres(root) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


_DOWN = {"redis": _redis_down, "postgresql": _postgres_down}


def _up(root: Path, config: ServicesConfig) -> None:
    """Start each configured server that does not run; on a failure, stop those this call started
    (a Redis left without its PostgreSQL would outlive the failed start) and raise."""
    started: list[str] = []
    try:
        for name in config.services:
            port, new = _redis_up(root, config) if name == "redis" else _postgres_up(root, config)
            started += [name] if new else []
            state = "started" if new else "already running"
            print(f"{name}: {state} on 127.0.0.1:{port} (data in {root / DATA_DIRS[name]})", file=sys.stderr)
    except BaseException:
        for name in reversed(started):
            _DOWN[name](root)
            print(f"{name}: stopped again (this start failed)", file=sys.stderr)
        raise


def _print_urls(root: Path, config: ServicesConfig) -> bool:
    """Print `NAME=url` for each configured service that runs; False when one does not."""
    all_running = True
    for name in config.services:
        found = running_redis(root) if name == "redis" else running_postgres(root)
        if found is None:
            print(f"collector services: {name} is not running under {root}", file=sys.stderr)
            all_running = False
        elif name == "redis":
            print(f"REDIS_URL={_redis_url(found[1], config)}")
        else:
            print(f"DATABASE_URL={_database_url(found[1], config)}")
    return all_running


def _print_stack_urls(label: str, env_file: Path) -> int:
    from dotenv import dotenv_values

    values = dotenv_values(env_file)
    for name in ("REDIS_URL", "DATABASE_URL"):
        if values.get(name):
            print(f"{name}={values[name]}")
    print(f"collector services: the running `{label}` stack ({env_file})", file=sys.stderr)
    return 0


def services_command(action: str, directory: str) -> int:
    """`collector services up|down|env --dir DIR`: manage a private Redis and PostgreSQL in DIR.

    `up` starts whichever of them does not run yet (ports LOCAL_REDIS_PORT / LOCAL_POSTGRES_PORT,
    default 16379 / 15432) and prints `REDIS_URL=...` and `DATABASE_URL=...` on stdout; an `up` that
    fails stops again what it started. `env` only prints them (exit 1 when one is not running); `down`
    stops them. LOCAL_SERVICES names the ones each action handles (default both). Every action is
    idempotent. Progress goes to stderr (`NAME: started ...`, which scripts/stack.sh reads) so stdout
    can be saved as an env file. Exit 2 on an error, with one line.
    """
    root = Path(directory)
    try:
        config = services_config()
        if action == "up":
            root.mkdir(parents=True, exist_ok=True)
            _up(root, config)
            return 0 if _print_urls(root, config) else 2
        if action == "env":
            stack = running_stack(root)
            if stack is not None:  # `make demo` uses its own database numbers: print what it uses
                return _print_stack_urls(*stack)
            return 0 if _print_urls(root, config) else 1
        if action == "down":
            for name in config.services:
                print(f"{name}: {'stopped' if _DOWN[name](root) else 'not running'}", file=sys.stderr)
            return 0
        raise ValueError(f"unknown action {action!r} (up, down or env)")
    except (ValueError, RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as error:
        print(f"collector services: {error}", file=sys.stderr)
        return 2
