"""The pipeline benchmark's running system: throwaway Redis and PostgreSQL, the fake exchange, and the
collector's own processes started from its Procfile (`collector streams`, both Celery workers, beat).

Only the collector's command line, its Procfile, its Redis key patterns and its table names are used,
so the same benchmark runs against any version of the collector given by PYTHONPATH.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from fakeload import FakeControl, start_own_fake
from pipeline_db import start_bench_postgres
from processes import proc_table, stop, tree_cpu_s, tree_peak_rss_mb

import collector
from collector.local.servers import LocalService, free_port, start_redis

BIN = Path(sys.executable).parent
# The collector's processes as `make run` starts them (Procfile names); web and flower are not the pipeline.
PIPELINE = ("streams", "worker-ingest", "worker-rest", "beat")
# What a queued envelope may sit in: the queues and the batches being written (any shard or suffix).
BACKLOG_PATTERNS = ("collector:queue:*", "collector:inflight:*")
READY_TIMEOUT_S = 120.0


def collector_root() -> Path:
    """The checkout of the collector being measured (PYTHONPATH decides which)."""
    return Path(collector.__file__).resolve().parents[1]


def procfile_commands(path: Path) -> dict[str, list[str]]:
    """`name: command` lines of a Procfile, split like a shell would."""
    commands = {}
    for line in path.read_text().splitlines():
        name, found, command = line.partition(":")
        if found and not line.startswith("#") and name.strip():
            commands[name.strip()] = shlex.split(command)
    return commands


def collector_env(redis_url: str, database_url: str, fake_port: int) -> dict[str, str]:
    """Settings of the measured collector: aggTrades only, every symbol the fake lists, REST polls hourly."""
    fake = f"127.0.0.1:{fake_port}"
    return {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "BINANCE_SPOT_WS_URL": f"ws://{fake}/spot",
        "BINANCE_FUTURES_WS_URL": f"ws://{fake}/futures",
        "BINANCE_SPOT_REST_URL": f"http://{fake}/spot",
        "BINANCE_FUTURES_REST_URL": f"http://{fake}/futures",
        "SPOT_SYMBOLS": "ALL",
        "FUTURES_SYMBOLS": "ALL",
        "SPOT_STREAMS": "aggTrade",
        "FUTURES_STREAMS": "aggTrade",
        "OPEN_INTEREST_INTERVAL_S": "3600",
        "DEPTH_SNAPSHOT_INTERVAL_S": "3600",
    }


def backlog(client: redis.Redis) -> int:
    """Envelopes waiting in Redis: every list (or stream) under the queue and in-flight patterns."""
    found = [key for pattern in BACKLOG_PATTERNS for key in client.scan_iter(match=pattern, count=1000)]
    if not found:
        return 0
    pipe = client.pipeline(transaction=False)
    for key in found:
        pipe.type(key)
    kinds = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for key, kind in zip(found, kinds, strict=True):
        if kind == b"list":
            pipe.llen(key)
        elif kind == b"stream":
            pipe.xlen(key)
    return sum(int(n) for n in pipe.execute())


class BacklogWatch(threading.Thread):
    """Samples the backlog every `interval_s` on its own connection; `take_max()` since the last call."""

    def __init__(self, url: str, interval_s: float = 0.25) -> None:
        super().__init__(name="backlog-watch", daemon=True)
        self.client = redis.Redis.from_url(url)
        self.interval_s = interval_s
        self.latest = 0
        self._max = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = backlog(self.client)
            with self._lock:
                self.latest = value
                self._max = max(self._max, value)

    def take_max(self) -> int:
        with self._lock:
            value, self._max = self._max, self.latest
        return value

    def close(self) -> None:
        self._stop.set()


@dataclass
class Stack:
    """Everything the benchmark started, and how to measure and stop it."""

    workdir: Path
    redis: LocalService
    postgres: LocalService
    timescale_installed: bool
    fake: subprocess.Popen[bytes]
    fake_port: int
    control: FakeControl
    env: dict[str, str] = field(default_factory=dict)
    idle_bound: int = 100  # a backlog at most this large counts as drained (the idle rate keeps flowing)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def roots(self) -> dict[str, int]:
        """Process group name -> the pid whose tree it is."""
        assert self.redis.process is not None
        postmaster = int((self.postgres.data_dir / "postmaster.pid").read_text().split()[0])
        roots = {"fake-exchange": self.fake.pid}
        roots |= {name: process.pid for name, process in self.processes.items() if process.poll() is None}
        return roots | {"redis-server": self.redis.process.pid, "postgres": postmaster}

    def cpu(self) -> dict[str, float]:
        table = proc_table()
        return {name: tree_cpu_s(pid, table) for name, pid in self.roots().items()}

    def peak_rss(self) -> dict[str, dict[str, float]]:
        found = {}
        for name, pid in self.roots().items():
            largest, total = tree_peak_rss_mb(pid)
            processes = len([p for p in proc_table().values() if p.pid == pid or p.ppid == pid])
            found[name] = {"largest_mb": largest, "sum_mb": total, "processes": float(processes)}
        return found

    def start_collector(self) -> None:
        """`collector init-db`, then the Procfile's pipeline processes (from the collector's checkout)."""
        env = {**os.environ, **self.env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        (self.workdir / "var").mkdir(exist_ok=True)  # beat's --schedule var/celerybeat-schedule
        subprocess.run(
            [str(BIN / "collector"), "init-db"], env=env, cwd=self.workdir, check=True, capture_output=True
        )
        procfile = collector_root() / "Procfile"
        commands = procfile_commands(
            procfile if procfile.exists() else Path(__file__).parents[1] / "Procfile"
        )
        for name in PIPELINE:
            args = commands[name]
            if (BIN / args[0]).exists():
                args = [str(BIN / args[0]), *args[1:]]
            log = (self.workdir / f"{name}.log").open("wb")
            self.processes[name] = subprocess.Popen(
                args, env=env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop_processes(self, names: tuple[str, ...]) -> None:
        for name in names:
            process = self.processes.get(name)
            if process is not None:
                stop(process)
                try:
                    os.killpg(process.pid, 9)  # leftover pool children
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        self.stop_processes(tuple(self.processes))
        stop(self.fake)
        self.postgres.stop()
        self.redis.stop()


def start_stack(workdir: Path, symbols: int, statements: bool) -> Stack:
    """Redis, PostgreSQL and the fake (full speed, `symbols` made-up symbols per market besides its own)."""
    redis_server = start_redis(workdir / "redis")
    postgres, timescale = start_bench_postgres(workdir / "pg", statements)
    port = free_port()
    extra = ["--total-rate", "0", "--spot-symbol-count", str(symbols), "--futures-symbol-count", str(symbols)]
    fake = start_own_fake(port, workdir / "fake.log", extra)
    stack = Stack(workdir, redis_server, postgres, timescale, fake, port, FakeControl(port))
    stack.env = collector_env(redis_server.url, postgres.url, port)
    return stack


def wait_for(condition: object, timeout_s: float, what: str, interval_s: float = 0.5) -> float:
    """Poll `condition()` until truthy; seconds it took. Raises TimeoutError naming `what`."""
    assert callable(condition)
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"pipeline bench: no {what} after {timeout_s:.0f} s")
        time.sleep(interval_s)
    return time.monotonic() - started
