"""`make demo`'s start-up: the stream process, started as Procfile.demo starts it, waits for the fake."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from collector.fake.server import FakeExchange, base_urls
from collector.local.servers import free_port
from collector.settings import Settings
from tests.processes import BIN, Process, wait_until

ROOT = Path(__file__).resolve().parent.parent
WAIT_FOR_PORT = ROOT / "scripts" / "wait_for_port.py"


def _demo_line(name: str) -> list[str]:
    for line in (ROOT / "Procfile.demo").read_text().splitlines():
        match = re.match(rf"^{name}:\s*(.+)$", line)
        if match:
            return shlex.split(match.group(1))
    raise AssertionError(f"Procfile.demo has no {name} line")


def _binance_urls(port: int) -> dict[str, str]:
    """BINANCE_*_URL of a fake exchange on `port`."""
    urls = base_urls("127.0.0.1", port)
    return {
        f"BINANCE_{k.upper()}_URL": urls[k] for k in ("spot_ws", "futures_ws", "spot_rest", "futures_rest")
    }


def test_demo_streams_start_once_the_fake_exchange_listens(settings: Settings, tmp_path: Path) -> None:
    """Started before the fake exchange, the demo's stream process waits for its port, then connects
    at the first attempt: no `ws.connect_failed`."""
    port = free_port()
    argv = _demo_line("streams")
    argv[argv.index("19443")] = str(port)  # the demo's port, which a running demo may hold
    argv[:2] = [sys.executable, str(ROOT / argv[1])]
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "SPOT_SYMBOLS": "BTCUSDT",
        "FUTURES_SYMBOLS": "BTCUSDT",
        **_binance_urls(port),
    }
    streams = Process("streams", argv, env, tmp_path)
    # honcho starts the lines together; the fake may come up later. A stream process started at the
    # same moment without the wait (its own Redis database, a port nothing listens on) marks the
    # time: once it has logged a connection attempt, the waiting one has had as long to make one.
    reference_env = {
        **env,
        **_binance_urls(free_port()),
        "REDIS_URL": settings.redis_url.rsplit("/", 1)[0] + "/1",
    }
    reference = Process("reference", [str(BIN / "collector"), "streams"], reference_env, tmp_path)
    try:
        wait_until(lambda: "ws." in reference.log(), 30, f"a connection attempt ({reference.log_path})")
        reference.stop()
        assert streams.popen.poll() is None, streams.log()
        assert "ws." not in streams.log(), "the stream process started before the fake listened"
        # Still the wait script (it becomes `collector streams` by exec, same pid): still waiting.
        assert WAIT_FOR_PORT.name in Path(f"/proc/{streams.popen.pid}/cmdline").read_text()
        with FakeExchange(port=port, rate=50):
            wait_until(lambda: "ws.connected" in streams.log(), 30, f"a connection ({streams.log_path})")
            streams.stop()  # before the fake stops: its going would make a reconnect fail
    finally:
        reference.stop()
        streams.stop()
    assert "ws.connect_failed" not in streams.log(), streams.log()


def test_wait_for_port_starts_the_command_anyway_after_its_timeout(tmp_path: Path) -> None:
    """Nothing listening: after `--timeout-s` one stderr line says so, and the command runs all the same."""
    command = [sys.executable, "-c", "print('ran')"]
    done = subprocess.run(
        [sys.executable, str(WAIT_FOR_PORT), str(free_port()), "--timeout-s", "0.3", "--", *command],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ran\n"
    assert "wait_for_port: nothing listens on 127.0.0.1:" in done.stderr
    assert "anyway" in done.stderr
