"""The benchmarks' load: the project's fake exchange as a subprocess, its control endpoints, and a
minimal client that receives and discards every frame (the fake's rate to a client that does nothing).

The pipeline benchmark starts the fake from this checkout (`python -m collector.fake`, PYTHONPATH =
the folder above bench/), whatever collector it measures: the load generator stays the same when
the collector under test is an older version given by PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from processes import cpu_percent, cpu_sample
from websockets.asyncio.client import connect

from collector.local.servers import wait_for_port

ROOT = Path(__file__).resolve().parents[1]  # the checkout this script belongs to
CONTROL_TIMEOUT_S = 10.0


def start_own_fake(port: int, log: Path, extra: list[str]) -> subprocess.Popen[bytes]:
    """`python -m collector.fake --port PORT EXTRA...` from this checkout; returns once it listens."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "collector.fake", "--port", str(port), *extra]
    process = subprocess.Popen(args, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    wait_for_port(port)
    return process


def get_json(url: str, method: str = "GET") -> Any:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=CONTROL_TIMEOUT_S) as response:
        return json.loads(response.read())


class FakeControl:
    """The fake's `/_fake/...` endpoints over HTTP."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/_fake"

    def _call(self, method: str, path: str) -> Any:
        return get_json(self.base + path, method)

    def trading_symbols(self, market: str) -> list[str]:
        """The symbols the fake's exchangeInfo lists as TRADING on `market`."""
        path = "api/v3/exchangeInfo" if market == "spot" else "fapi/v1/exchangeInfo"
        info = get_json(f"{self.base.removesuffix('/_fake')}/{market}/{path}")
        return [entry["symbol"] for entry in info["symbols"] if entry["status"] == "TRADING"]

    def counts(self) -> dict[str, Any]:
        """`/_fake/counts`: frames sent, and each connection's counts."""
        found: dict[str, Any] = self._call("GET", "/counts")
        return found

    def set_total_rate(self, rate: float) -> None:
        """Data events/s of all connections together (0 = full speed)."""
        self._call("POST", f"/rate?value={rate}&total=1")

    def pause(self) -> None:
        self._call("POST", "/pause")

    def resume(self) -> None:
        self._call("POST", "/resume")

    def frames_sent(self) -> int:
        """Data frames written so far on every connection."""
        return int(self.counts()["data_frames_sent"])

    def streams(self) -> int:
        """Streams subscribed on the open connections."""
        counts = self.counts()["connections"]
        return sum(len(c["streams"]) for c in counts if c["open"])


def stream_urls(base: str, names: list[str], per_connection: int) -> list[str]:
    """Combined-stream URLs (`<base>/stream?streams=a/b/...`) carrying `names`, `per_connection` each."""
    return [
        f"{base}/stream?streams=" + "/".join(names[start : start + per_connection])
        for start in range(0, len(names), per_connection)
    ]


async def raw_client_rate(
    urls: list[str], seconds: float, context: ssl.SSLContext | None = None
) -> tuple[float, float, float]:
    """Frames/s and MB/s a client that only counts and discards frames receives; and its CPU%.
    `context` trusts the fake's CA when it serves wss:// (--tls)."""
    frames = 0
    size = 0

    async def drain(url: str, deadline: float) -> None:
        nonlocal frames, size
        async with connect(
            url,
            ping_interval=None,
            compression=None,
            max_size=None,
            max_queue=4096,
            close_timeout=0.5,
            ssl=context,
        ) as ws:
            # A connection that gets nothing (a stream name the fake does not serve) ends at the deadline.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - time.monotonic()):
                    while time.monotonic() < deadline:
                        frame = await ws.recv(decode=False)
                        frames += 1
                        size += len(frame)

    warmup_deadline = time.monotonic() + 1.0
    deadline = warmup_deadline + seconds
    tasks = [asyncio.create_task(drain(url, deadline)) for url in urls]
    await asyncio.sleep(max(0.0, warmup_deadline - time.monotonic()))
    start_frames, start_size, start_cpu = frames, size, cpu_sample(os.getpid())
    # Sample at the deadline, not after the close handshake: a flooded client can wait its whole
    # close_timeout for the server's close frame, which would dilute the rate.
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    end_frames, end_size, end_cpu = frames, size, cpu_sample(os.getpid())
    await asyncio.gather(*tasks)
    elapsed = end_cpu.wall - start_cpu.wall
    return (
        (end_frames - start_frames) / elapsed,
        (end_size - start_size) / elapsed / 1e6,
        cpu_percent(start_cpu, end_cpu),
    )
