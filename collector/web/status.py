"""`collector status`: the health snapshot as text for a terminal, ending in `HEALTHY` or `UNHEALTHY: ...`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from collector.local.stack import NO_STACK
from collector.queue.client import redis_client
from collector.queue.loop_lag import LoopLag
from collector.queue.stream_shards import RUNNING
from collector.rest.planner import MarketRestState, rest_state
from collector.settings import Settings, redacted_url
from collector.web.health import HealthReport, HealthSnapshot, age_s, assess, now_us, snapshot

COUNTER_ENTRIES_SHOWN = 6  # per counter, the largest label sets; the rest are summed up as "+N more"
ERROR_CHARS_SHOWN = 80


def render(settings: Settings, stack: str | None = None) -> tuple[str, bool]:
    """Take a snapshot and describe it; returns the text and whether the collector is healthy.

    `stack`: the local stack the CLI found to talk to, `NO_STACK` when none runs and the defaults
    were used, None when REDIS_URL / DATABASE_URL were configured.
    """
    client = redis_client(settings)
    try:
        # A one-shot command: Redis down is in the text, not also in a log line.
        snap = snapshot(settings, client, log_changes=False)
        rest = rest_state(client) if snap.redis_up else []
    finally:
        client.close()
    if not snap.redis_up and snap.redis_error:
        error = f"Redis at {redacted_url(settings.redis_url)} {snap.redis_error.removeprefix('Redis ')}"
        if stack == NO_STACK:
            # The defaults were only tried because nothing runs: lead with that, in the Redis line.
            error, stack = f"{NO_STACK}; {error}", None
        snap = replace(snap, redis_error=error)
    now = now_us()
    report = assess(snap, now, settings)
    return format_status(snap, report, now, rest, stack), report.healthy


def format_status(
    snap: HealthSnapshot,
    report: HealthReport,
    now: int,
    rest: Sequence[MarketRestState] = (),
    stack: str | None = None,
) -> str:
    """The text of `collector status`. Pure."""
    lines = ["services", *_indent(([f"stack       {stack}"] if stack else []) + _services(snap)), ""]
    if snap.redis_up:
        lines += ["stream processes", *_indent(_shards(snap, now)), ""]
        lines += ["connections", *_indent(_connections(snap, now)), ""]
        lines += ["streams", *_indent(_streams(snap, now)), ""]
        lines += [
            "queues",
            *_indent([*_tables(snap, now), f"drain loops running: {snap.drain_loops}", *_backlog(snap, now)]),
            "",
        ]
        lines += [f"dead letters: {snap.deadletter_length}", ""]
        lines += ["open gaps", *_indent(_open_gaps(snap, now)), ""]
        lines += ["rest weight (per minute)", *_indent(_rest(rest)), ""]
        lines += ["counters", *_indent(_counters(snap)), ""]
    lines.append("HEALTHY" if report.healthy else "UNHEALTHY: " + "; ".join(report.reasons))
    return "\n".join(lines)


def format_age(seconds: float | None) -> str:
    """`0.4s`, `42s`, `12m05s`, `3h02m`, `2d04h`; `never` for None."""
    if seconds is None:
        return "never"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _ago(then_us: int | None, now: int) -> str:
    age = age_s(then_us, now)
    return "never" if age is None else f"{format_age(age)} ago"


def _indent(lines: list[str]) -> list[str]:
    return ["  " + line for line in lines]


def _columns(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _open_gaps(snap: HealthSnapshot, now: int) -> list[str]:
    if not snap.open_gaps:
        return ["none"]
    rows = [(g.kind, g.market, g.name, g.cause, _ago(g.since_us, now)) for g in snap.open_gaps]
    return _columns(("KIND", "MARKET", "SYMBOL/STREAM", "CAUSE", "SINCE"), rows)


def format_interval(seconds: float) -> str:
    """A poll interval: `0.5s`, `5s`, `30s`, `1m46s`, `5m00s`; whole seconds show no decimals."""
    return f"{seconds:.3g}s" if seconds < 10 else format_age(seconds)


def _weight(value: object) -> str:
    """Request weight as whole numbers (the plan keeps one decimal; the log line shows none)."""
    return f"{float(value):.0f}" if isinstance(value, int | float) else "-"


def _rest(states: Sequence[MarketRestState]) -> list[str]:
    rows = []
    for state in states:
        plan = state.plan or {}
        intervals = plan.get("intervals_s")
        every = (
            ", ".join(f"{kind} {format_interval(float(s))}" for kind, s in intervals.items())
            if isinstance(intervals, dict)
            else "-"
        )
        stretch = float(str(plan.get("stretch", 1)))
        rows.append(
            (
                state.market,
                plan.get("symbols", "-"),
                state.used_1m,
                _weight(plan.get("needed_1m")),
                _weight(plan.get("available_1m")),
                _weight(plan.get("limit_1m")),
                f"x{stretch:.2f}" if stretch > 1 else "-",
                every,
                f"{format_age(state.paused_for_s)} (429/418)" if state.paused_for_s > 0 else "-",
            )
        )
    if not any(state.plan for state in states):
        return ["no REST plan announced yet (celery beat / worker-rest not started)"]
    header = ("MARKET", "SYMBOLS", "USED", "NEEDED", "AVAILABLE", "LIMIT", "STRETCH", "EVERY", "PAUSED")
    return _columns(header, rows)


def _services(snap: HealthSnapshot) -> list[str]:
    return [
        "redis       " + ("up" if snap.redis_up else f"DOWN  {snap.redis_error}"),
        "postgresql  " + ("up" if snap.postgres_up else f"DOWN  {snap.postgres_error}"),
        *(["database    " + str(snap.database["detail"])] if snap.database else []),
    ]


def _short(text: str | None) -> str:
    if not text:
        return ""
    return text if len(text) <= ERROR_CHARS_SHOWN else text[: ERROR_CHARS_SHOWN - 1] + "…"


def _shards(snap: HealthSnapshot, now: int) -> list[str]:
    """One row per stream process (shard): is it beating, where it runs, its event loop's worst block."""
    if not snap.shards:
        return ["(none registered)"]
    rows = []
    for record in snap.shards:
        lag = snap.loop_lags.get(record.label)
        state = "DOWN" if record.state == RUNNING and record.stale(now) else record.state
        rows.append(
            (
                record.label,
                state,
                record.host or "-",
                record.pid or "-",
                record.run or "-",
                _ago(record.alive_us or None, now),
                "-" if lag is None else f"{lag.max_block_ms:.0f} ms ({lag.blocks_over} over)",
            )
        )
    return _columns(("SHARD", "STATE", "HOST", "PID", "RUN", "HEARTBEAT", "LOOP BLOCK MAX"), rows)


def _connections(snap: HealthSnapshot, now: int) -> list[str]:
    if not snap.connections:
        return ["(none registered)"]
    header = (
        "ID",
        "MARKET",
        "FAMILY",
        "STATE",
        "STREAMS",
        "LAST MESSAGE",
        "UP FOR",
        "MESSAGES",
        "RECONNECTS",
        "ERROR",
    )
    rows = [
        (
            c.connection_id,
            c.market,
            c.family,
            c.state,
            len(c.streams),
            _ago(c.last_message_us, now),
            format_age(age_s(c.connected_since_us, now)) if c.state == "connected" else "-",
            c.messages,
            c.reconnects,
            # A connected connection's last error is history (it is counted in RECONNECTS).
            _short(c.last_error) if c.state != "connected" else "",
        )
        for c in snap.connections
    ]
    return _columns(header, rows)


def _streams(snap: HealthSnapshot, now: int) -> list[str]:
    loop = [] if snap.loop_lag is None else [_loop_line(snap.loop_lag)]
    if not snap.streams:
        return [*loop, "(no message received yet)"]
    rows = [(s.market, s.stream, s.messages, _ago(s.last_message_us, now)) for s in snap.streams]
    return [*loop, *_columns(("MARKET", "STREAM", "MESSAGES", "LAST MESSAGE"), rows)]


def _loop_line(lag: LoopLag) -> str:
    """The stream process's event loop in one line: its longest block, and how much was its own work."""
    return (
        f"event loop: longest block {lag.max_block_ms:.0f} ms (own work {lag.max_cpu_ms:.0f} ms), "
        f"{lag.blocks_over} over {lag.block_warn_ms:g} ms this run"
    )


def _tables(snap: HealthSnapshot, now: int) -> list[str]:
    rows = [(t.table, t.queue_length, t.inflight_length, _ago(t.last_drain_us, now)) for t in snap.tables]
    return _columns(("TABLE", "QUEUED", "IN-FLIGHT", "LAST DRAIN"), rows)


def format_bytes(size: int) -> str:
    """`812 B`, `4.2 kB`, `31.0 MB`, `2.10 GB` (powers of 1000, as `df -H`)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{size} B"


def _backlog(snap: HealthSnapshot, now: int) -> list[str]:
    """The backlog in one line, the spill in another while there is one."""
    backlog, spill = snap.backlog, snap.spill
    if backlog.eta_s is not None:
        pace = f"drains {backlog.drain_rate:,.0f}/s, about {format_age(backlog.eta_s)} to drain"
    elif backlog.drain_rate is None:
        pace = "drain pace unknown (no stream process has published it)"
    else:
        pace = "nothing drained lately: no estimate (is PostgreSQL up, a worker running?)"
    lines = [
        f"backlog: {backlog.total:,} = {backlog.queued:,} in Redis + {backlog.in_flight:,} in flight"
        f" + {backlog.spilled:,} spilled; {pace}"
    ]
    if spill is not None and (spill.envelopes or spill.spilling):
        free = "" if spill.disk_free_bytes is None else f", {format_bytes(spill.disk_free_bytes)} free"
        lines.append(
            f"spill: {format_bytes(spill.bytes)} on disk in {spill.segments} segment(s), oldest "
            f"{_ago(spill.oldest_us, now)}{free}; Redis lists ~{format_bytes(spill.queue_bytes)} of "
            f"{format_bytes(spill.cap_bytes)} cap" + ("; new envelopes go to disk" if spill.spilling else "")
        )
    return lines


def _counters(snap: HealthSnapshot) -> list[str]:
    rows = []
    for name, values in snap.counters.items():
        ranked = sorted(values.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{'|'.join(labels)}={value}" for labels, value in ranked[:COUNTER_ENTRIES_SHOWN])
        if len(ranked) > COUNTER_ENTRIES_SHOWN:
            shown += f", +{len(ranked) - COUNTER_ENTRIES_SHOWN} more"
        rows.append((name, sum(values.values()), shown or "-"))
    return _columns(("COUNTER", "TOTAL", "LARGEST"), rows)
