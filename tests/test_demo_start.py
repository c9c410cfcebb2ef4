"""`make demo`'s start-up: the stream process, started as Procfile.demo starts it, waits for the fake."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from collector.fake.server import FakeExchange, base_urls
from collector.local.servers import free_port
from collector.settings import Settings
from tests.processes import BIN, TIMEOUT_FACTOR, Process, wait_until

ROOT = Path(__file__).resolve().parent.parent
WAIT_FOR_PORT = ROOT / "scripts" / "wait_for_port.py"


def _demo_line(name: str) -> list[str]:
    for line in (ROOT / "Procfile.demo").read_text().splitlines():
        match = re.match(rf"^{name}:\s*(.+)$", line)
        if match:
            return shlex.split(match.group(1))
    raise AssertionError(f"Procfile.demo has no {name} line")


def test_demo_streams_start_once_the_fake_exchange_listens(settings: Settings, tmp_path: Path) -> None:
    """Started before the fake exchange, the demo's stream process waits for its port, then connects
    at the first attempt: no `ws.connect_failed`."""
    port = free_port()
    argv = _demo_line("streams")
    argv[argv.index("19443")] = str(port)  # the demo's port, which a running demo may hold
    argv[:2] = [sys.executable, str(ROOT / argv[1])]
    urls = base_urls("127.0.0.1", port)
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "SPOT_SYMBOLS": "BTCUSDT",
        "FUTURES_SYMBOLS": "BTCUSDT",
        "BINANCE_SPOT_WS_URL": urls["spot_ws"],
        "BINANCE_FUTURES_WS_URL": urls["futures_ws"],
        "BINANCE_SPOT_REST_URL": urls["spot_rest"],
        "BINANCE_FUTURES_REST_URL": urls["futures_rest"],
    }
    streams = Process("streams", argv, env, tmp_path)
    try:
        time.sleep(2 * TIMEOUT_FACTOR)  # honcho starts the lines together; the fake may come up later
        assert streams.popen.poll() is None, streams.log()
        assert "ws." not in streams.log(), "the stream process started before the fake listened"
        with FakeExchange(port=port, rate=50):
            wait_until(lambda: "ws.connected" in streams.log(), 30, f"a connection ({streams.log_path})")
    finally:
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
