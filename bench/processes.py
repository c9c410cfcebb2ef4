"""What the benchmarks do with the processes they run: read their CPU time and peak resident set from
/proc, and stop them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSample:
    wall: float
    cpu_s: float


def cpu_sample(pid: int) -> CpuSample:
    """utime+stime of a process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return CpuSample(time.monotonic(), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)


def cpu_percent(first: CpuSample, second: CpuSample) -> float:
    return 100.0 * (second.cpu_s - first.cpu_s) / (second.wall - first.wall)


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM (the peak resident set) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


def stop(process: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    """SIGTERM, then SIGKILL (to its whole group when it leads one: a Celery worker's pool) if it
    has not exited within `timeout_s`; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # not a group leader
                process.kill()
            process.wait(10)
    return process.returncode
