"""Start and stop a private Redis and PostgreSQL under a folder of ours, for `make run` and the tests.

Used only when REDIS_URL / DATABASE_URL are not configured. PostgreSQL's `initdb` and `postgres`
refuse to run as root, so as root the cluster is created and run as the `postgres` system user.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

POSTGRES_SYSTEM_USER = "postgres"
START_TIMEOUT_S = 30


@dataclass
class LocalService:
    """A server we started: how to reach it and how to stop it."""

    name: str
    url: str
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.name == "postgresql":
            _run_as_pg_owner(
                [pg_bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"], check=False
            )
        elif self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server binary (Debian keeps them out of PATH)."""
    found = shutil.which(name)
    if found:
        return found
    bindir = subprocess.run(
        ["pg_config", "--bindir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return str(Path(bindir) / name)


def timescaledb_installed() -> bool:
    """True when this machine's PostgreSQL has the TimescaleDB extension files (loader and control)."""
    try:
        dirs = subprocess.run(
            ["pg_config", "--sharedir", "--pkglibdir"], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return False
    share, lib = Path(dirs[0]), Path(dirs[1])
    return (share / "extension" / "timescaledb.control").exists() and (lib / "timescaledb.so").exists()


def _run_as_pg_owner(command: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
    if os.geteuid() == 0:
        command = ["runuser", "-u", POSTGRES_SYSTEM_USER, "--", *command]
    return subprocess.run(command, check=check, capture_output=True)


def start_redis(data_dir: Path, port: int | None = None, persistent: bool = False) -> LocalService:
    """Run `redis-server` on 127.0.0.1; with `persistent`, an append-only file in `data_dir`."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install -y redis-server)")
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", ""]
    args += ["--appendonly", "yes" if persistent else "no", "--daemonize", "no", "--logfile", "redis.log"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return LocalService("redis", f"redis://127.0.0.1:{port}/0", port, data_dir, process)


def start_postgres(
    data_dir: Path, port: int | None = None, durable: bool = True, timescaledb: bool | None = None
) -> LocalService:
    """Create (once) and start a PostgreSQL cluster in `data_dir`, trusting local connections.

    `timescaledb`: preload the TimescaleDB library (None: whenever it is installed), without which
    the extension cannot be created.
    """
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        owner = pwd.getpwnam(POSTGRES_SYSTEM_USER)
        os.chown(data_dir, owner.pw_uid, owner.pw_gid)
        # The system user must be able to reach the folder through every parent.
        for parent in data_dir.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)
    data_dir.chmod(0o700)
    if not (data_dir / "PG_VERSION").exists():
        _run_as_pg_owner(
            [
                pg_bin("initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {data_dir} -c max_connections=200"
    if timescaledb is None:
        timescaledb = timescaledb_installed()
    if timescaledb:
        # Telemetry off: these servers have no internet, and the project's data is not to be reported.
        options += " -c shared_preload_libraries=timescaledb -c timescaledb.telemetry_level=off"
    if not durable:
        # Throwaway test clusters: skip fsync; crash safety of the test data does not matter.
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    log = data_dir / "postgres.log"
    _run_as_pg_owner(
        [pg_bin("pg_ctl"), "-D", str(data_dir), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]
    )
    wait_for_port(port)
    return LocalService("postgresql", f"postgresql://postgres@127.0.0.1:{port}/collector", port, data_dir)


# --- `collector services up|down|env`: long-lived servers for `make run` -------------------------
#
# Unlike the throwaway servers above, these outlive the command that starts them (Redis daemonizes,
# `pg_ctl` detaches the postmaster), keep their data under `<dir>/redis` and `<dir>/postgres`, and
# are found again through their pid files, so `up` is idempotent and `down` works from any shell.

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


def _alive(pid: int) -> bool:
    """True when `pid` runs (a zombie left by a parent that never reaps it does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user (the postgres system user)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


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


def _pid_from_file(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def running_redis(root: Path) -> tuple[int, int] | None:
    """(pid, port) of the Redis started under `root`, or None when it does not run."""
    pid = _pid_from_file(root / DATA_DIRS["redis"] / "redis.pid")
    port = _read_state(root).get("redis_port")
    if pid is None or port is None or not _alive(pid):
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
    return (pid, port) if _alive(pid) else None


# The stacks `scripts/stack.sh` starts: (what the user typed, the name of its pid and env files).
STACKS: Final = (("make run", "run"), ("make demo", "demo"))
# What operator commands say when neither runs and nothing is configured (they use the defaults).
NO_STACK: Final = "no local stack running (make run / make demo)"


def running_stack(root: Path) -> tuple[str, Path] | None:
    """The `make run` / `make demo` stack running from `root` (its honcho pid is alive): its name
    and the env file its processes use, or None."""
    for label, name in STACKS:
        pid = _pid_from_file(root / f"{name}.pid")
        env_file = root / f"{name}.env"
        if pid is not None and _alive(pid) and env_file.exists():
            return label, env_file
    return None


def _redis_url(port: int, config: ServicesConfig) -> str:
    return f"redis://127.0.0.1:{port}/{config.redis_db}"


def _database_url(port: int, config: ServicesConfig) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/{config.database_name}"


def _refuse_taken_port(name: str, port: int, variable: str) -> None:
    if _port_open(port):
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
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
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
    default 16379 / 15432) and prints `REDIS_URL=...` and `DATABASE_URL=...` on stdout; `env` only
    prints them (exit 1 when one is not running); `down` stops both. Every action is idempotent.
    Progress goes to stderr so stdout can be saved as an env file. Exit 2 on an error, with one line.
    """
    root = Path(directory)
    try:
        config = services_config()
        if action == "up":
            root.mkdir(parents=True, exist_ok=True)
            for name in config.services:
                port, started = _redis_up(root, config) if name == "redis" else _postgres_up(root, config)
                state = "started" if started else "already running"
                where = root / DATA_DIRS[name]
                print(f"{name}: {state} on 127.0.0.1:{port} (data in {where})", file=sys.stderr)
            return 0 if _print_urls(root, config) else 2
        if action == "env":
            stack = running_stack(root)
            if stack is not None:  # `make demo` uses its own database numbers: print what it uses
                return _print_stack_urls(*stack)
            return 0 if _print_urls(root, config) else 1
        if action == "down":
            for name, stop in (("redis", _redis_down), ("postgresql", _postgres_down)):
                print(f"{name}: {'stopped' if stop(root) else 'not running'}", file=sys.stderr)
            return 0
        raise ValueError(f"unknown action {action!r} (up, down or env)")
    except (ValueError, RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as error:
        print(f"collector services: {error}", file=sys.stderr)
        return 2
