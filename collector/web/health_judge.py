"""Health judging: facts in, verdicts out. Pure: no I/O, no clock.

`judge()` takes a snapshot, the current time and the thresholds and returns one line per reason the
collector is unhealthy (none: healthy). Each rule is its own function over plain data.
"""

from __future__ import annotations

from typing import Protocol

from collector.queue.connections import CONNECTED, ConnectionRecord
from collector.queue.stream_shards import CRASHED, RUNNING, ShardRecord
from collector.web.health_facts import HealthSnapshot, OpenGap, TableState, age_s


class HealthThresholds(Protocol):
    """The limits `judge` needs; `Settings` is one."""

    @property
    def health_max_message_age_s(self) -> float: ...

    @property
    def health_max_drain_age_s(self) -> float: ...

    @property
    def health_max_gap_open_s(self) -> float: ...


def judge(snap: HealthSnapshot, now: int, thresholds: HealthThresholds) -> list[str]:
    """Why the collector is unhealthy at time `now` (µs), one line per reason; [] when healthy."""
    reasons: list[str] = []
    if not snap.redis_up:
        reasons.append(snap.redis_error or "Redis is unreachable")
    if not snap.postgres_up:
        reasons.append(snap.postgres_error or "PostgreSQL is unreachable")
    elif snap.database is not None and not snap.database["ok"]:
        reasons.append(f"database: {snap.database['detail']}")
    if snap.redis_up:
        # Without Redis nothing below is known; "no connection registered" would be a false lead.
        reasons += shard_reasons(snap.shards, now)
        reasons += connection_reasons(snap.connections, now, thresholds.health_max_message_age_s)
        reasons += queue_reasons(snap.tables, now, thresholds.health_max_drain_age_s)
        reasons += gap_reasons(snap.open_gaps, now, thresholds.health_max_gap_open_s)
    reasons += loss_reasons(snap)
    return reasons


def loss_reasons(snap: HealthSnapshot) -> list[str]:
    """Envelopes queued by the stream process and never stored (collector.audit)."""
    return [
        f"lost {loss.count} {loss.table} events received between {loss.after_received.isoformat()} and "
        f"{loss.before_received.isoformat()} (queued, never stored: see `collector audit`)"
        for loss in snap.losses
    ]


def shard_reasons(shards: list[ShardRecord], now: int) -> list[str]:
    """A stream process whose heartbeat stopped (killed, crashed), or a shard of a layout never started.

    A shard stopped cleanly is left to `connection_reasons` (its connections say `stopped`).
    """
    reasons = []
    for record in shards:
        if record.state == RUNNING and record.stale(now):
            age = age_s(record.alive_us, now) or 0.0
            reasons.append(
                f"stream shard {record.label} is down: no heartbeat for {age:.0f}s ({record.describe()}); "
                "its symbols are not recorded"
            )
    labels = {record.label for record in shards}
    # A crashed shard of an earlier layout waits for the new layout's shards (registry._take_crash).
    layouts = {_count(record.label) for record in shards if record.state != CRASHED}
    for count in sorted(layouts - {0, 1}):
        for index in range(count):
            if f"{index}/{count}" not in labels:
                reasons.append(f"stream shard {index}/{count} has never run: its symbols are not recorded")
    return reasons


def _count(label: str) -> int:
    _, _, count = label.partition("/")
    return int(count) if count.isdigit() else 0


def connection_reasons(connections: list[ConnectionRecord], now: int, max_age_s: float) -> list[str]:
    if not connections:
        return ["no connection registered (is `collector streams` running?)"]
    reasons = []
    for conn in connections:
        if conn.state != CONNECTED:
            detail = f": {conn.last_error}" if conn.last_error else ""
            reasons.append(f"connection {conn.connection_id} is {conn.state}{detail}")
            continue
        # A connection that has not received anything yet is judged from when it connected.
        reference = conn.last_message_us if conn.last_message_us is not None else conn.connected_since_us
        age = age_s(reference, now)
        if age is None:
            reasons.append(f"connection {conn.connection_id} has received no message")
        elif age > max_age_s:
            reasons.append(
                f"connection {conn.connection_id}: last message {age:.0f}s ago (max {max_age_s:g}s)"
            )
    return reasons


def queue_reasons(tables: list[TableState], now: int, max_age_s: float) -> list[str]:
    reasons = []
    for table in tables:
        # The in-flight batch counts too: a drain that died mid-batch leaves it there.
        pending = table.queue_length + table.inflight_length
        if pending == 0:
            continue
        age = age_s(table.last_drain_us, now)
        if age is None:
            reasons.append(f"queue {table.table}: {pending} waiting and never drained")
        elif age > max_age_s:
            reasons.append(
                f"queue {table.table}: {pending} waiting, last drain {age:.0f}s ago (max {max_age_s:g}s)"
            )
    return reasons


def gap_reasons(gaps: list[OpenGap], now: int, max_open_s: float) -> list[str]:
    """A depth chain left unsynced: its resync snapshot did not come (REST refused, or banned)."""
    reasons = []
    for gap in gaps:
        age = age_s(gap.since_us, now) or 0.0
        if gap.kind == "depth" and age > max_open_s:
            reasons.append(
                f"depth gap {gap.market} {gap.name} ({gap.cause}) open for {age:.0f}s "
                f"(max {max_open_s:g}s): its resync snapshot is not stored"
            )
    return reasons
