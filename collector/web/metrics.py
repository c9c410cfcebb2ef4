"""Prometheus export: the shared Redis counters and the state gauges, built from one health snapshot.

The counters live in Redis (`collector.queue.counters`) because every process adds to them; this
module only reads. `families()` is pure; `SnapshotCollector` is the thin prometheus_client shell that
takes a fresh snapshot on each scrape. With Redis down only `collector_redis_up 0` and
`collector_postgres_up` (and `collector_timescaledb_in_use`) are exported, so a scrape never fails.

The REST weight gauges come from two more Redis reads at scrape time (`read_rest_weights`): the
weight spent this UTC minute per market and the REST planner's plan (`collector:rest:plan`, written
by `collector.rest.planner`); `rest_families()` turns them into metrics, purely.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from collector.queue import keys
from collector.queue.connections import CONNECTED
from collector.queue.counters import COUNTERS
from collector.web.health import HealthSnapshot, age_s, now_us

logger = logging.getLogger(__name__)

PREFIX = "collector"
REST_MARKETS: Final = ("spot", "futures")
# Gauge name -> (field of a market's plan JSON in collector:rest:plan, help text).
PLAN_GAUGES: Final = {
    "rest_weight_limit_1m": ("limit_1m", "Binance's request weight limit per minute for the market"),
    "rest_weight_needed_1m": (
        "needed_1m",
        "Request weight per minute the configured REST intervals need (REST planner)",
    ),
    "rest_weight_available_1m": (
        "available_1m",
        "Request weight per minute the REST planner lets scheduled polls spend",
    ),
    "rest_interval_stretch": (
        "stretch",
        "Factor the REST planner stretched the configured intervals by to fit the weight (1: none)",
    ),
}


def families(snap: HealthSnapshot, now: int) -> list[Metric]:
    """All metric families for one snapshot taken at `now` (µs). Pure."""
    up: list[Metric] = [
        _single("redis_up", "1 when Redis answered this scrape", 1 if snap.redis_up else 0),
        _single(
            "postgres_up", "1 when PostgreSQL answered SELECT 1 in this scrape", 1 if snap.postgres_up else 0
        ),
    ]
    if snap.database is not None:
        up.append(
            _single(
                "timescaledb_in_use",
                "1 when the database keeps the market data in TimescaleDB hypertables, 0 for plain tables",
                1 if snap.database["mode"] == "timescaledb" else 0,
            )
        )
    lost = GaugeMetricFamily(
        f"{PREFIX}_lost_events",
        "Envelopes queued by the stream process but never stored, received in the last hour",
        labels=["table"],
    )
    for table in keys.TABLES:  # zeros too: a dashboard sees the series before anything is lost
        lost.add_metric([table], sum(loss.count for loss in snap.losses if loss.table == table))
    up.append(lost)
    if not snap.redis_up:
        return up
    open_gaps = GaugeMetricFamily(
        f"{PREFIX}_open_gaps", "Gaps of the ledger not closed yet (depth: awaiting resync)", labels=["kind"]
    )
    for kind in ("depth", "stream"):
        open_gaps.add_metric([kind], sum(1 for g in snap.open_gaps if g.kind == kind))
    return [*up, *_counters(snap), *_queue_gauges(snap, now), *_stream_gauges(snap, now), open_gaps]


def _single(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _counters(snap: HealthSnapshot) -> list[Metric]:
    result: list[Metric] = []
    for name, (documentation, labels) in COUNTERS.items():
        # prometheus_client appends `_total` to the sample name of a counter family.
        family = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=list(labels))
        for label_values, value in sorted(snap.counters.get(name, {}).items()):
            family.add_metric(list(label_values), value)
        result.append(family)
    return result


def _queue_gauges(snap: HealthSnapshot, now: int) -> list[Metric]:
    queue = GaugeMetricFamily(
        f"{PREFIX}_queue_length",
        "Envelopes waiting in Redis per table (over its queue shards)",
        labels=["table"],
    )
    inflight = GaugeMetricFamily(
        f"{PREFIX}_inflight_length", "Envelopes in the batch being written per table", labels=["table"]
    )
    drain = GaugeMetricFamily(
        f"{PREFIX}_drain_last_success_age_seconds",
        "Seconds since the last committed drain batch per table (absent: never)",
        labels=["table"],
    )
    for table in snap.tables:
        queue.add_metric([table.table], table.queue_length)
        inflight.add_metric([table.table], table.inflight_length)
        drained = age_s(table.last_drain_us, now)
        if drained is not None:
            drain.add_metric([table.table], drained)
    deadletter = _single("deadletter_length", "Entries in the dead-letter list", snap.deadletter_length)
    loops = _single(
        "drain_loops", "Drain loops running, over every worker (DRAIN_LOOPS at most)", snap.drain_loops
    )
    return [queue, inflight, drain, deadletter, loops, *_backlog_gauges(snap)]


def _backlog_gauges(snap: HealthSnapshot) -> list[Metric]:
    """The backlog (lists + in flight + spill), the spill on disk and the estimated time to drain."""
    backlog, spill = snap.backlog, snap.spill
    result: list[Metric] = [
        _single(
            "backlog_envelopes",
            "Envelopes waiting to be stored: Redis lists, in flight and spilled",
            backlog.total,
        ),
        _single(
            "spill_envelopes",
            "Envelopes the stream process spilled to disk, not yet fed back",
            backlog.spilled,
        ),
        _single(
            "spill_bytes",
            "Bytes of the stream process's spill on disk, not yet fed back",
            backlog.spill_bytes,
        ),
        _single(
            "spill_active",
            "1 while new envelopes of some Redis list go to the spill",
            int(bool(spill and spill.spilling)),
        ),
    ]
    if spill is not None:
        result.append(
            _single(
                "queue_bytes_estimate",
                "Bytes the Redis lists hold, as the stream process estimates them",
                spill.queue_bytes,
            )
        )
        result.append(
            _single(
                "queue_cap_bytes",
                "REDIS_MAX_QUEUE_BYTES: past it the stream process spills to disk",
                spill.cap_bytes,
            )
        )
        result.append(
            _single(
                "drain_rate", "Envelopes per second the drains took off the lists lately", spill.drain_rate
            )
        )
    if backlog.eta_s is not None:  # absent while nothing drains: no finite estimate
        result.append(
            _single(
                "backlog_drain_eta_seconds",
                "Estimated seconds to drain the backlog at the recent pace",
                backlog.eta_s,
            )
        )
    return result


def _stream_gauges(snap: HealthSnapshot, now: int) -> list[Metric]:
    stream_age = GaugeMetricFamily(
        f"{PREFIX}_stream_last_message_age_seconds",
        "Seconds since the last event of each stream",
        labels=["market", "stream"],
    )
    for stream in snap.streams:
        age = age_s(stream.last_message_us, now)
        if age is not None:
            stream_age.add_metric([stream.market, stream.stream], age)
    connection_up = GaugeMetricFamily(
        f"{PREFIX}_connection_up", "1 when the WebSocket connection is connected", labels=["connection"]
    )
    for conn in snap.connections:
        connection_up.add_metric([conn.connection_id], 1 if conn.state == CONNECTED else 0)
    # The stream process's event loop (collector.streams.lag), for the run that published last.
    block = GaugeMetricFamily(
        f"{PREFIX}_stream_loop_block_max_seconds",
        "Longest event-loop block of the stream process in its current run",
    )
    over = GaugeMetricFamily(
        f"{PREFIX}_stream_loop_blocks_over_threshold",
        "Event-loop blocks of the stream process's current run longer than its warning threshold (100 ms)",
    )
    if snap.loop_lag is not None:
        block.add_metric([], snap.loop_lag.max_block_ms / 1000)
        over.add_metric([], snap.loop_lag.blocks_over)
    # Each stream process (shard `i/n`; `0/1` unsharded): alert on a heartbeat that stops growing young.
    heartbeat = GaugeMetricFamily(
        f"{PREFIX}_stream_shard_heartbeat_age_seconds",
        "Seconds since each stream process (shard) last wrote its heartbeat; it writes one every second",
        labels=["shard", "state"],
    )
    for record in snap.shards:
        age = age_s(record.alive_us or None, now)
        if age is not None:
            heartbeat.add_metric([record.label, record.state], age)
    return [stream_age, connection_up, block, over, heartbeat]


@dataclass(frozen=True)
class RestWeights:
    """What the REST weight gauges show, as read from Redis at one scrape."""

    used_1m: dict[str, int]  # market -> weight spent in the current UTC minute (0: no key)
    plans: dict[str, bytes] = field(default_factory=dict)  # market -> the planner's JSON, as stored


def read_rest_weights(client: redis.Redis, now_s: float | None = None) -> RestWeights:
    """This minute's weight counter per market and the planner's plans, in one round trip."""
    minute = int(time.time() if now_s is None else now_s) // 60
    pipe = client.pipeline(transaction=False)
    for market in REST_MARKETS:
        pipe.get(keys.rest_weight(market, minute))
    pipe.hgetall(keys.REST_PLAN)
    *used, plans = pipe.execute()
    return RestWeights(
        used_1m={market: int(value or 0) for market, value in zip(REST_MARKETS, used, strict=True)},
        plans={_text(market): value for market, value in plans.items()},
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_plan(raw: bytes | str) -> dict[str, Any] | None:
    """A market's plan JSON as a dict, or None when it is not one. Pure."""
    try:
        plan = json.loads(raw)
    except ValueError:
        return None
    return plan if isinstance(plan, dict) else None


def rest_families(weights: RestWeights) -> list[Metric]:
    """The REST weight gauges. A market without a (readable) plan has no plan samples; every
    family is still declared, so a dashboard finds its series as soon as a planner writes. Pure."""
    used = GaugeMetricFamily(
        f"{PREFIX}_rest_weight_used_1m",
        "REST request weight spent on the market in the current UTC minute (shared Redis counter)",
        labels=["market"],
    )
    for market in REST_MARKETS:
        used.add_metric([market], weights.used_1m.get(market, 0))
    planned = {
        name: GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=["market"])
        for name, (_, documentation) in PLAN_GAUGES.items()
    }
    for market in REST_MARKETS:
        raw = weights.plans.get(market)
        plan = None if raw is None else parse_plan(raw)
        if plan is None:
            continue
        for name, (plan_field, _) in PLAN_GAUGES.items():
            value = plan.get(plan_field)
            # bool is an int to Python, never a weight; null (an infinite stretch in orjson) is no sample.
            if isinstance(value, int | float) and not isinstance(value, bool):
                planned[name].add_metric([market], float(value))
    return [used, *planned.values()]


class SnapshotCollector(Collector):
    """A prometheus_client collector that takes a fresh snapshot on every scrape.

    `rest_source` (optional) reads the REST weights; it is asked only while Redis is up.
    """

    def __init__(
        self,
        source: Callable[[], HealthSnapshot],
        clock: Callable[[], int] = now_us,
        rest_source: Callable[[], RestWeights] | None = None,
    ) -> None:
        self._source = source
        self._clock = clock
        self._rest_source = rest_source
        self._bad_plans: set[str] = set()

    def collect(self) -> Iterable[Metric]:
        snap = self._source()
        result = families(snap, self._clock())
        if snap.redis_up and self._rest_source is not None:
            try:
                weights = self._rest_source()
            except redis.RedisError as error:
                # Redis went away since the snapshot; the next scrape reports collector_redis_up 0.
                logger.warning("metrics.rest_weights_unread error=%s", error)
            else:
                self._report_bad_plans(weights)
                result.extend(rest_families(weights))
        return result

    def _report_bad_plans(self, weights: RestWeights) -> None:
        """One warning when a market's plan becomes unreadable (its gauges vanish), not one per scrape."""
        bad = {market for market, raw in weights.plans.items() if parse_plan(raw) is None}
        for market in sorted(bad - self._bad_plans):
            logger.warning(
                "metrics.bad_rest_plan market=%s key=%s (not a JSON object; its plan gauges are left out)",
                market,
                keys.REST_PLAN,
            )
        self._bad_plans = bad


def make_registry(
    source: Callable[[], HealthSnapshot], rest_source: Callable[[], RestWeights] | None = None
) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding only the snapshot collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source, rest_source=rest_source))
    return registry
