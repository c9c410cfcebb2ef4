"""Start and stop a private Redis and PostgreSQL under a folder of ours: for the tests, the benchmarks
and `collector services` (`make run`).

Servers started here belong to the process that started them (`LocalService.stop`); the `collector
services` command (`collector.local.services`) adds the long-lived, found-again-by-pid-file kind.
PostgreSQL's `initdb` and `postgres` refuse to run as root, so as root the cluster is created and
run as the `postgres` system user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

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


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port` now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(port):
            return
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
