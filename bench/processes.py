"""What the benchmarks do with the processes they run: read their CPU time and peak resident set from
/proc (of one process, or of a process and all its descendants: a Celery worker's pool, PostgreSQL's
backends), and stop them."""

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


@dataclass(frozen=True)
class ProcStat:
    """What /proc/<pid>/stat says of one process: its parent, and its CPU seconds (utime+stime) and
    those of its children it has reaped (cutime+cstime)."""

    pid: int
    ppid: int
    own_cpu_s: float
    reaped_cpu_s: float


def proc_stat(pid: int) -> ProcStat | None:
    """One process's ProcStat; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    ticks = [int(value) for value in fields[11:15]]  # utime stime cutime cstime (fields 14-17)
    return ProcStat(
        pid, int(fields[1]), (ticks[0] + ticks[1]) / CLOCK_TICKS, (ticks[2] + ticks[3]) / CLOCK_TICKS
    )


def proc_table() -> dict[int, ProcStat]:
    """Every process of the machine now, by pid."""
    table: dict[int, ProcStat] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None:
                table[stat.pid] = stat
    return table


def tree(root: int, table: dict[int, ProcStat]) -> list[int]:
    """`root` and its live descendants (pids present in `table`)."""
    children: dict[int, list[int]] = {}
    for stat in table.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, pending = [], [root] if root in table else []
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending += children.get(pid, [])
    return found


def tree_cpu_s(root: int, table: dict[int, ProcStat]) -> float:
    """CPU seconds of `root` and every descendant so far, those that exited included.

    Each live process counts its own time plus that of the children it reaped: a pool child or a
    backend that exits between two samples moves from its own count into its parent's reaped count,
    so the sum stays continuous (only a process reaped by someone outside the tree would be lost).
    """
    return sum(table[pid].own_cpu_s + table[pid].reaped_cpu_s for pid in tree(root, table))


def tree_peak_rss_mb(root: int) -> tuple[float, float]:
    """(largest, sum) of VmHWM over `root` and its live descendants, in MB."""
    peaks = []
    for pid in tree(root, proc_table()):
        try:
            peaks.append(peak_rss_mb(pid))
        except (FileNotFoundError, ProcessLookupError, RuntimeError):
            continue  # gone meanwhile, or a zombie
    return max(peaks, default=0.0), sum(peaks)


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
