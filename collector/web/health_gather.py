"""Health gathering: one snapshot of what Redis and PostgreSQL say. I/O, and nothing else.

`snapshot()` reads everything in one Redis pipeline plus a PostgreSQL check; it never raises for an
unreachable service, it records the error instead. What other processes wrote is parsed leniently:
they are built and deployed separately.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import redis

from collector.audit import Loss, find_losses
from collector.db import timescale
from collector.db.connection import connect
from collector.errors import ServiceUnavailable
from collector.logonce import Transitions
from collector.queue import keys
from collector.queue.batches import inflight_length
from collector.queue.client import describe_redis_error
from collector.queue.connections import read_connections
from collector.queue.counters import COUNTERS
from collector.queue.loop_lag import parse_loop_lags
from collector.queue.shards import present_lanes
from collector.queue.spill_stats import combine_figures, parse_figures, spill_keys
from collector.queue.stream_shards import read_shards
from collector.settings import Settings
from collector.web.health_facts import HealthSnapshot, OpenGap, StreamState, TableState

logger = logging.getLogger(__name__)

# /health reports envelopes lost within this window; `collector audit --since` looks further back.
LOSS_WINDOW = timedelta(hours=1)


def now_us() -> int:
    """Wall-clock time in microseconds, the unit every timestamp in Redis uses."""
    return time.time_ns() // 1000


def snapshot(settings: Settings, redis_client: redis.Redis, log_changes: bool = True) -> HealthSnapshot:
    """Read Redis (one pipeline) and check PostgreSQL; unreachable services become error strings.

    `log_changes`: log Redis going away and coming back (a long-running server); a one-shot command
    shows the error in its own output instead.
    """
    postgres_error, database, losses = check_postgres(settings)
    result = HealthSnapshot(
        redis_up=True,
        postgres_up=postgres_error is None,
        postgres_error=postgres_error,
        database=database,
        losses=losses,
    )
    try:
        _read_redis(redis_client, result, settings.queue_shards)
        if log_changes:
            _redis_state.report(up=True)
    except redis.RedisError as error:
        if log_changes:
            _redis_state.report(up=False, error=error)
        return HealthSnapshot(
            redis_up=False,
            postgres_up=result.postgres_up,
            redis_error=f"Redis {describe_redis_error(error)}",
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
    except ServiceUnavailable as error:
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


def _read_redis(client: redis.Redis, into: HealthSnapshot, queue_shards: int = 1) -> None:
    lanes = present_lanes(
        client, keys.TABLES, queue_shards
    )  # every shard that exists, beyond the setting too
    spills, _ = spill_keys(client)  # every stream shard's, a stopped or crashed one's too
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.CONNECTIONS)
    pipe.hgetall(keys.STREAM_MESSAGES)
    pipe.hgetall(keys.STREAM_LAST_US)
    pipe.hgetall(keys.DRAIN_LAST_SUCCESS_US)
    pipe.llen(keys.DEADLETTER)
    pipe.hgetall(keys.OPEN_GAPS)
    for table, shard in lanes:
        pipe.llen(keys.queue(table, shard))
    for name in COUNTERS:
        pipe.hgetall(keys.metric(name))
    pipe.hgetall(keys.STREAMS_LOOP)
    pipe.zcount(keys.DRAIN_LOOPS, now_us() // 1000, "+inf")  # slots not yet expired
    pipe.hgetall(keys.STREAM_SHARDS)
    for name in spills:
        pipe.hgetall(name)
    replies = pipe.execute()
    spill = replies[len(replies) - len(spills) :]
    *replies, loop_lag, drain_loops, shards = replies[: len(replies) - len(spills)]
    connections, messages, last_us, drains, deadletters, open_gaps = replies[:6]
    queued: dict[str, int] = {}
    for (table, _), length in zip(lanes, replies[6 : 6 + len(lanes)], strict=True):
        queued[table] = queued.get(table, 0) + int(length)
    counter_hashes = replies[6 + len(lanes) :]
    into.open_gaps = sorted(_parse_open_gaps(_decode_hash(open_gaps)), key=lambda g: g.since_us)

    into.connections = read_connections(connections)
    into.streams = _parse_streams(_decode_hash(messages), _decode_hash(last_us))
    last_drain = _decode_hash(drains)
    into.tables = [
        # Summed over the table's queue shards. Batches in flight live in one list each, listed in a
        # set per shard (see collector.queue.batches).
        TableState(
            table,
            queued.get(table, 0),
            inflight_length(client, table, [k for t, k in lanes if t == table]),
            _int_or_none(last_drain.get(table)),
        )
        for table in keys.TABLES
    ]
    into.deadletter_length = int(deadletters)
    into.drain_loops = int(drain_loops)
    into.spill = combine_figures(parse_figures(raw) for raw in spill)
    into.loop_lags = parse_loop_lags(loop_lag)
    into.shards = read_shards(shards)
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
