"""bench/pipeline.py: its arithmetic, and a short real run at a low rate (not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # the bench modules import each other as scripts beside each other

from pipeline_report import (  # noqa: E402
    FAKE,
    cpu_deltas,
    highest_sustained,
    next_search_rate,
    per_100k,
    percentile,
    sustained,
    us_per_message,
)
from pipeline_stack import procfile_commands  # noqa: E402
from processes import ProcStat, tree, tree_cpu_s  # noqa: E402

TIMEOUT_FACTOR = float(os.environ.get("TIMEOUT_FACTOR", "1"))
STEP_FIELDS = {
    "target",
    "window_s",
    "offered",
    "offered_per_s",
    "stored_per_s",
    "rows_of_window",
    "backlog_max",
    "backlog_max_s_of_input",
    "drained",
    "drain_s",
    "latency_s",
    "cpu_s",
    "cpu_messages",
    "cpu_s_per_100k",
    "cpu_us_per_msg",
    "sustained",
}
GROUPS = {"fake-exchange", "streams", "worker-ingest", "worker-rest", "beat", "redis-server", "postgres"}


def test_cpu_per_100k_counts_every_group_and_leaves_the_fake_out_of_the_collector() -> None:
    """CPU seconds per 100k messages per group; `collector` and µs/msg sum all groups but the fake."""
    before = {FAKE: 10.0, "streams": 1.0, "postgres": 5.0}
    after = {FAKE: 12.0, "streams": 4.0, "postgres": 6.0, "beat": 1.0}
    spent = cpu_deltas(before, after)
    assert spent == {FAKE: 2.0, "streams": 3.0, "postgres": 1.0}
    scaled = per_100k(spent, 200_000)
    assert scaled == {FAKE: 1.0, "streams": 1.5, "postgres": 0.5, "collector": 2.0}
    assert us_per_message(spent, 200_000) == pytest.approx(20.0)
    assert per_100k(spent, 0) == {} and us_per_message(spent, 0) is None


def test_tree_cpu_counts_descendants_and_the_children_they_reaped() -> None:
    """A process tree's CPU is its members' own time plus what they reaped; other trees are left out."""
    table = {
        1: ProcStat(1, 0, 100.0, 0.0),
        10: ProcStat(10, 1, 2.0, 3.0),  # a worker that has reaped pool children worth 3 s
        11: ProcStat(11, 10, 4.0, 0.0),
        12: ProcStat(12, 11, 0.5, 0.0),
        20: ProcStat(20, 1, 50.0, 0.0),  # someone else
    }
    assert sorted(tree(10, table)) == [10, 11, 12]
    assert tree_cpu_s(10, table) == pytest.approx(9.5)
    assert tree_cpu_s(99, table) == 0.0


def test_percentile_interpolates_like_postgres_percentile_cont() -> None:
    """Linear interpolation between the closest ranks, as percentile_cont does."""
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile(list(map(float, range(101))), 0.99) == pytest.approx(99.0)


def test_sustained_needs_the_rate_offered_stored_bounded_and_drained() -> None:
    """A step holds when it was offered, stored (less one batch), bounded to 5 s of input and drained."""
    assert sustained(10_000, 10_000, 9_600, 20_000, True, 30.0)
    assert not sustained(10_000, 9_000, 9_000, 0, True, 30.0)  # the fake fell short
    assert not sustained(10_000, 10_000, 9_000, 0, True, 30.0)  # stored too little
    assert not sustained(10_000, 10_000, 10_000, 60_000, True, 30.0)  # backlog past 5 s
    assert not sustained(10_000, 10_000, 10_000, 0, False, 30.0)  # never drained


def test_search_steps_up_from_the_highest_rate_that_held_and_halves_the_gap_to_a_failure() -> None:
    """Stepping goes a step above the best rate that held, or halfway to the first that failed."""
    assert next_search_rate([(10e3, True), (20e3, True), (50e3, False)], 10e3) == 30e3
    assert next_search_rate([(10e3, True), (20e3, False)], 10e3) == 15e3
    assert next_search_rate([(10e3, True), (20e3, False), (15e3, False)], 10e3) == 12.5e3
    assert next_search_rate([(10e3, True), (20e3, False), (15e3, False), (12.5e3, True)], 10e3) is None
    assert next_search_rate([(10e3, True), (50e3, True)], 10e3) == 60e3
    assert next_search_rate([(10e3, False)], 10e3) == 5e3
    assert next_search_rate([(10e3, False), (5e3, False), (2.5e3, False)], 10e3) is None
    assert highest_sustained([(10e3, True), (30e3, False), (20e3, True)]) == 20e3
    assert highest_sustained([(10e3, False)]) is None


def test_procfile_commands_are_read_as_a_shell_splits_them(tmp_path: Path) -> None:
    """Comments are skipped and each `name: command` line is split into arguments."""
    procfile = tmp_path / "Procfile"
    procfile.write_text("# comment: not a process\nbeat: celery -A collector beat --schedule 'var/x y'\n")
    assert procfile_commands(procfile) == {
        "beat": ["celery", "-A", "collector", "beat", "--schedule", "var/x y"]
    }


def test_a_short_run_reports_every_field_and_stores_all_it_was_offered(tmp_path: Path) -> None:
    """A few seconds at 500 msg/s through the real pipeline: the JSON has every field, nothing lost."""
    args = [sys.executable, str(BENCH / "pipeline.py"), "--rates", "500", "--duration", "3", "--warmup", "1"]
    args += [
        "--search-steps",
        "0",
        "--limit-seconds",
        "1",
        "--copy-rows",
        "2000",
        "--probe-envelopes",
        "2000",
    ]
    args += ["--out", str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300 * TIMEOUT_FACTOR)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("pipeline-*.json")).read_text())
    assert report == json.loads(done.stdout.strip().splitlines()[-1])
    (step,) = report["steps"]
    assert set(step) == STEP_FIELDS and set(step["cpu_s"]) == GROUPS and set(report["peak_rss"]) == GROUPS
    assert set(step["latency_s"]) == {"p50", "p99", "max"} and step["latency_s"]["p99"] is not None
    assert step["offered"] > 0 and step["drained"] and step["cpu_us_per_msg"] > 0
    assert report["whole_run"]["offered"] > 0 and report["whole_run"]["lost"] == 0
    assert report["whole_run"]["stored"] == report["whole_run"]["offered"]
    assert report["postgres"]["settings"]["fsync"] == "on"
    assert report["postgres"]["settings"]["track_commit_timestamp"] == "on"
    assert report["redis_bytes_per_envelope"]["used_memory_delta_per_envelope"] > 0
    assert report["bytes_per_row"]["agg_trades"]["bytes_per_row"] > 0
    if report["postgres"]["timescaledb"]:
        assert report["bytes_per_row"]["agg_trades"]["compressed_bytes_per_row"] > 0
    limits = report["limits"]
    assert limits["plain_copy"]["rows_per_s"] > 0 and limits["fake_to_discarding_client"]["frames_per_s"] > 0
