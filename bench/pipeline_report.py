"""The pipeline benchmark's arithmetic and its tables: pure functions over plain data (tested in
tests/test_bench_pipeline.py), no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

FAKE = "fake-exchange"  # the load generator: measured, but not part of the collector's cost
# A rate is sustained when the pipeline stores what was offered, the backlog stays within the
# issue's bound (never more than 5 s of input) and drains once the load drops.
MAX_BACKLOG_S = 5.0
# Rows are committed in batches, up to about a drain tick apart: a window's edges may cut that much
# input off the rows committed within it without any backlog building up.
BATCH_ALLOWANCE_S = 1.5
MIN_SIZED_ROWS = 1000  # smaller tables (bookkeeping, a REST poll or two) are in the JSON only
OFFERED_SHARE = 0.95  # the fake must really have offered the rate asked for


def cpu_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds each process group used between two samples (groups present in both)."""
    return {name: max(0.0, after[name] - before[name]) for name in before if name in after}


def per_100k(cpu_s: Mapping[str, float], messages: int) -> dict[str, float]:
    """CPU seconds per 100,000 messages, per process group, plus `collector` (all but the fake)."""
    if messages <= 0:
        return {}
    scaled = {name: 1e5 * value / messages for name, value in cpu_s.items()}
    scaled["collector"] = sum(value for name, value in scaled.items() if name != FAKE)
    return scaled


def us_per_message(cpu_s: Mapping[str, float], messages: int) -> float | None:
    """The collector's CPU µs per message: every group but the fake, summed."""
    if messages <= 0:
        return None
    return 1e6 * sum(value for name, value in cpu_s.items() if name != FAKE) / messages


def percentile(values: Sequence[float], share: float) -> float | None:
    """Linear-interpolated percentile (as PostgreSQL's percentile_cont); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def sustained(
    target: float, offered: float, stored: float, backlog_max: int, drained: bool, window_s: float
) -> bool:
    """Whether a step kept up: offered what was asked, stored it (rates, msg/s, over a window of
    `window_s`, less one batch's worth), the backlog bounded and drained afterwards."""
    return (
        offered >= OFFERED_SHARE * target
        and stored >= offered * (1 - BATCH_ALLOWANCE_S / window_s)
        and backlog_max <= MAX_BACKLOG_S * target
        and drained
    )


def next_search_rate(results: Sequence[tuple[float, bool]], step: float) -> float | None:
    """The next rate to try when looking for the highest sustained one: `step` above the highest that
    held, or halfway to the lowest that did not when that is nearer (half the lowest when none held);
    None when they are within a quarter step."""
    held = [rate for rate, ok in results if ok]
    failed = [rate for rate, ok in results if not ok]
    if not held:  # even the lowest failed: halve it, down to a quarter step
        half = round(min(failed, default=0.0) / 2 / 500) * 500
        return half if half >= step / 4 else None
    best = max(held)
    if not failed:
        return best + step
    gap = min(failed) - best
    if gap <= step / 4:
        return None
    return best + min(step, round(gap / 2 / 500) * 500)


def highest_sustained(results: Sequence[tuple[float, bool]]) -> float | None:
    return max((rate for rate, ok in results if ok), default=None)


# --- rendering --------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:,.0f}"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_table(steps: Sequence[Mapping[str, Any]]) -> str:
    headers = [
        "rate asked",
        "offered msg/s",
        "stored msg/s",
        "backlog max",
        "drained",
        "p50 ms",
        "p99 ms",
        "max ms",
        "µs CPU/msg",
        "sustained",
    ]
    rows = [
        [
            f"{step['target']:,.0f}",
            _num(step["offered_per_s"]),
            _num(step["stored_per_s"]),
            f"{step['backlog_max']:,}",
            f"yes ({step['drain_s']:.0f} s)" if step["drained"] else "NO",
            _ms(step["latency_s"]["p50"]),
            _ms(step["latency_s"]["p99"]),
            _ms(step["latency_s"]["max"]),
            _num(step["cpu_us_per_msg"], 1),
            "yes" if step["sustained"] else "no",
        ]
        for step in steps
    ]
    return markdown(headers, rows)


def cpu_table(steps: Sequence[Mapping[str, Any]], groups: Sequence[str]) -> str:
    """CPU seconds per 100k messages: one row per process group, one column per rate."""
    headers = ["CPU s per 100k msgs", *(f"{step['target']:,.0f}/s" for step in steps)]
    rows = [
        [name, *(_num(step["cpu_s_per_100k"].get(name), 2) for step in steps)]
        for name in [*groups, "collector"]
    ]
    return markdown(headers, rows)


def rss_table(rss: Mapping[str, Mapping[str, float]]) -> str:
    rows = [
        [name, _num(value["largest_mb"], 1), _num(value["sum_mb"], 1), f"{value['processes']:.0f}"]
        for name, value in rss.items()
    ]
    return markdown(["peak RSS (VmHWM)", "largest process MB", "sum MB", "processes"], rows)


def size_table(sizes: Mapping[str, Mapping[str, Any]]) -> str:
    rows = [
        [
            table,
            f"{value['rows']:,}",
            _num(value["bytes_per_row"], 1),
            _num(value.get("compressed_bytes_per_row"), 1),
        ]
        for table, value in sizes.items()
        if value["rows"] >= MIN_SIZED_ROWS
    ]
    return markdown(["table", "rows", "bytes/row", "bytes/row compressed"], rows)
