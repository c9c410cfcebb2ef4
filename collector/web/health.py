"""Health: one snapshot of what Redis and PostgreSQL say (I/O), and the pure rules that judge it.

`snapshot()` reads everything in one Redis pipeline plus a PostgreSQL `SELECT 1`; it never raises
for an unreachable service, it records the error instead. `assess()` is pure: given a snapshot, the
current time and the thresholds, it says healthy or not, with one line per reason, and builds the
JSON body of `/health`. `/metrics` and `collector status` read the same snapshot.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import psycopg2
import redis

from collector.audit import Loss, find_losses
from collector.db import timescale
from collector.db.connection import connect
from collector.errors import ConfigError, ServiceUnavailable
from collector.logonce import Transitions
from collector.queue import keys
from collector.queue.batches import inflight_length
from collector.queue.connections import CONNECTED, ConnectionRecord, read_connections
from collector.queue.counters import COUNTERS
from collector.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamState:
    """Events received on one `<market>:<stream>` and when the last one arrived."""

    market: str
    stream: str
    messages: int
    last_message_us: int | None


@dataclass(frozen=True)
class TableState:
    """One table's Redis queue, its in-flight batch, and its last committed drain."""

    table: str
    queue_length: int
    inflight_length: int
    last_drain_us: int | None


@dataclass(frozen=True)
class OpenGap:
    """A gap of the ledger not closed yet: a depth chain awaiting its resync, or a stream outage."""

    kind: str  # "depth" or "stream"
    market: str
    name: str  # the symbol (depth) or the stream
    since_us: int
    cause: str


@dataclass
class HealthSnapshot:
    """Everything the monitoring views show, read at one moment. Empty lists when Redis is down."""

    redis_up: bool
    postgres_up: bool
    redis_error: str | None = None
    postgres_error: str | None = None
    # Which mode the database is in (`collector.db.timescale.describe`): mode, ok, detail.
    database: dict[str, Any] | None = None
    # Envelopes lost between the stream process and PostgreSQL in the last LOSS_WINDOW (collector.audit).
    losses: list[Loss] = field(default_factory=list)
    connections: list[ConnectionRecord] = field(default_factory=list)
    streams: list[StreamState] = field(default_factory=list)
    tables: list[TableState] = field(default_factory=list)
    deadletter_length: int = 0
    open_gaps: list[OpenGap] = field(default_factory=list)
    # counter name -> label values -> value
    counters: dict[str, dict[tuple[str, ...], int]] = field(default_factory=dict)


class HealthThresholds(Protocol):
    """The limits `assess` needs; `Settings` is one."""

    @property
    def health_max_message_age_s(self) -> float: ...

    @property
    def health_max_drain_age_s(self) -> float: ...

    @property
    def health_max_gap_open_s(self) -> float: ...


@dataclass(frozen=True)
class HealthReport:
    """The verdict: healthy or not, one line per reason, and the JSON body of `/health`."""

    healthy: bool
    reasons: list[str]
    body: dict[str, Any]


# /health reports envelopes lost within this window; `collector audit --since` looks further back.
LOSS_WINDOW = timedelta(hours=1)


def now_us() -> int:
    """Wall-clock time in microseconds, the unit every timestamp in Redis uses."""
    return time.time_ns() // 1000


# --- I/O --------------------------------------------------------------------------------------------


def snapshot(settings: Settings, redis_client: redis.Redis) -> HealthSnapshot:
    """Read Redis (one pipeline) and check PostgreSQL; unreachable services become error strings."""
    postgres_error, database, losses = check_postgres(settings)
    result = HealthSnapshot(
        redis_up=True,
        postgres_up=postgres_error is None,
        postgres_error=postgres_error,
        database=database,
        losses=losses,
    )
    try:
        _read_redis(redis_client, result)
        _redis_state.report(up=True)
    except redis.RedisError as error:
        _redis_state.report(up=False, error=error)
        return HealthSnapshot(
            redis_up=False,
            postgres_up=result.postgres_up,
            redis_error=f"Redis is unreachable: {error}",
            postgres_error=postgres_error,
            database=database,
            losses=losses,
        )
    return result


_redis_state = Transitions(logger, "health.redis")


def report_redis(up: bool, error: object = None) -> None:
    """Record whether Redis answered (logs only the changes); the web server reports its start too."""
    _redis_state.report(up, error)


def check_postgres(settings: Settings) -> tuple[str | None, dict[str, Any] | None, list[Loss]]:
    """(None, database mode, recent losses) when PostgreSQL answers within DATABASE_CONNECT_TIMEOUT_S,
    else (one line why not, None, [])."""
    try:
        conn = connect(settings, autocommit=True)
    except (ServiceUnavailable, ConfigError) as error:
        return str(error), None, []
    try:
        with conn.cursor() as cur:
            database = timescale.describe(cur)
            cur.execute("SELECT to_regclass('ingest_ranges') IS NOT NULL")
            audited = cur.fetchone()[0]
            since = datetime.now(UTC) - LOSS_WINDOW
            return None, database, find_losses(cur, since) if audited else []
    except psycopg2.Error as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"PostgreSQL did not answer: {reason}", None, []
    finally:
        conn.close()


def _read_redis(client: redis.Redis, into: HealthSnapshot) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.CONNECTIONS)
    pipe.hgetall(keys.STREAM_MESSAGES)
    pipe.hgetall(keys.STREAM_LAST_US)
    pipe.hgetall(keys.DRAIN_LAST_SUCCESS_US)
    pipe.llen(keys.DEADLETTER)
    pipe.hgetall(keys.OPEN_GAPS)
    for table in keys.TABLES:
        pipe.llen(keys.queue(table))
    for name in COUNTERS:
        pipe.hgetall(keys.metric(name))
    replies = pipe.execute()
    connections, messages, last_us, drains, deadletters, open_gaps = replies[:6]
    queued = replies[6 : 6 + len(keys.TABLES)]
    counter_hashes = replies[6 + len(keys.TABLES) :]
    into.open_gaps = sorted(_parse_open_gaps(_decode_hash(open_gaps)), key=lambda g: g.since_us)

    into.connections = read_connections(connections)
    into.streams = _parse_streams(_decode_hash(messages), _decode_hash(last_us))
    last_drain = _decode_hash(drains)
    into.tables = [
        # Batches in flight live in one list each, listed in a set (see collector.queue.batches).
        TableState(table, int(queued[i]), inflight_length(client, table), _int_or_none(last_drain.get(table)))
        for i, table in enumerate(keys.TABLES)
    ]
    into.deadletter_length = int(deadletters)
    into.counters = {
        name: _parse_counter(name, len(COUNTERS[name][1]), _decode_hash(values))
        for name, values in zip(COUNTERS, counter_hashes, strict=True)
    }


# --- parsing of what other processes wrote (lenient: they are built separately) ---------------------


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _parse_open_gaps(fields: dict[str, str]) -> list[OpenGap]:
    """`keys.OPEN_GAPS`: `depth/<market>/<symbol>/<µs>` or `stream/<market>/<stream>` -> JSON."""
    gaps = []
    for name, raw in fields.items():
        parts = name.split("/")
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if len(parts) < 3 or not isinstance(record, dict):
            continue
        since = _int_or_none(record.get("detected_at_us", record.get("started_at_us")))
        if since is None:
            continue
        gaps.append(OpenGap(parts[0], parts[1], parts[2], since, str(record.get("cause", "?"))))
    return gaps


def _int_or_none(value: object) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(float(_text(value)))
    except (ValueError, OverflowError):
        return None


def _parse_streams(messages: dict[str, str], last_us: dict[str, str]) -> list[StreamState]:
    result = []
    for name in sorted(set(messages) | set(last_us)):
        market, _, stream = name.partition(":")
        result.append(
            StreamState(
                market, stream, _int_or_none(messages.get(name)) or 0, _int_or_none(last_us.get(name))
            )
        )
    return result


def _parse_counter(name: str, label_count: int, values: dict[str, str]) -> dict[tuple[str, ...], int]:
    result: dict[tuple[str, ...], int] = {}
    for joined, raw in values.items():
        # The last label may itself contain `|` (an error reason), so split from the left only.
        labels = tuple(joined.split("|", label_count - 1)) if label_count else ()
        value = _int_or_none(raw)
        if len(labels) != label_count or value is None:
            logger.warning("health.bad_counter_field counter=%s field=%r", name, joined)
            continue
        result[labels] = value
    return result


# --- pure judgement -----------------------------------------------------------------------------------


def assess(snap: HealthSnapshot, now: int, thresholds: HealthThresholds) -> HealthReport:
    """Judge a snapshot at time `now` (µs). Pure: no I/O, no clock."""
    reasons: list[str] = []
    if not snap.redis_up:
        reasons.append(snap.redis_error or "Redis is unreachable")
    if not snap.postgres_up:
        reasons.append(snap.postgres_error or "PostgreSQL is unreachable")
    elif snap.database is not None and not snap.database["ok"]:
        reasons.append(f"database: {snap.database['detail']}")
    if snap.redis_up:
        # Without Redis nothing below is known; "no connection registered" would be a false lead.
        reasons += _connection_reasons(snap.connections, now, thresholds.health_max_message_age_s)
        reasons += _queue_reasons(snap.tables, now, thresholds.health_max_drain_age_s)
        reasons += _gap_reasons(snap.open_gaps, now, thresholds.health_max_gap_open_s)
    reasons += [
        f"lost {loss.count} {loss.table} events received between {loss.after_received.isoformat()} and "
        f"{loss.before_received.isoformat()} (queued, never stored: see `collector audit`)"
        for loss in snap.losses
    ]
    return HealthReport(healthy=not reasons, reasons=reasons, body=_body(snap, now, reasons))


def age_s(then_us: int | None, now: int) -> float | None:
    """Seconds from `then_us` to `now`, never negative (clocks of two processes may differ slightly)."""
    if then_us is None:
        return None
    return max(0.0, (now - then_us) / 1_000_000)


def _connection_reasons(connections: list[ConnectionRecord], now: int, max_age_s: float) -> list[str]:
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


def _queue_reasons(tables: list[TableState], now: int, max_age_s: float) -> list[str]:
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


def _gap_reasons(gaps: list[OpenGap], now: int, max_open_s: float) -> list[str]:
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


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _body(snap: HealthSnapshot, now: int, reasons: list[str]) -> dict[str, Any]:
    return {
        "healthy": not reasons,
        "reasons": reasons,
        "checked_at_us": now,
        "redis": {"up": snap.redis_up, "error": snap.redis_error},
        "postgres": {"up": snap.postgres_up, "error": snap.postgres_error, "database": snap.database},
        "connections": [
            {
                "connection_id": c.connection_id,
                "market": c.market,
                "family": c.family,
                "state": c.state,
                "streams": list(c.streams),
                "connected_for_s": _rounded(age_s(c.connected_since_us, now)),
                "last_message_age_s": _rounded(age_s(c.last_message_us, now)),
                "messages": c.messages,
                "reconnects": c.reconnects,
                "last_error": c.last_error,
            }
            for c in snap.connections
        ],
        "streams": [
            {
                "market": s.market,
                "stream": s.stream,
                "messages": s.messages,
                "last_message_age_s": _rounded(age_s(s.last_message_us, now)),
            }
            for s in snap.streams
        ],
        "tables": [
            {
                "table": t.table,
                "queue_length": t.queue_length,
                "inflight_length": t.inflight_length,
                "last_drain_age_s": _rounded(age_s(t.last_drain_us, now)),
            }
            for t in snap.tables
        ],
        "deadletter_length": snap.deadletter_length,
        "lost_events": [
            {
                "table": loss.table,
                "count": loss.count,
                "received_after": loss.after_received.isoformat(),
                "received_before": loss.before_received.isoformat(),
            }
            for loss in snap.losses
        ],
        "open_gaps": [
            {
                "kind": g.kind,
                "market": g.market,
                "name": g.name,
                "cause": g.cause,
                "open_for_s": _rounded(age_s(g.since_us, now)),
            }
            for g in snap.open_gaps
        ],
        "counters": {
            name: {"|".join(labels): value for labels, value in sorted(values.items())}
            for name, values in snap.counters.items()
        },
    }
