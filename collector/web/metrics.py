"""Prometheus export: the shared Redis counters and the state gauges, built from one health snapshot.

The counters live in Redis (`collector.queue.counters`) because every process adds to them; this
module only reads. `families()` is pure; `SnapshotCollector` is the thin prometheus_client shell that
takes a fresh snapshot on each scrape. With Redis down only `collector_redis_up 0` and
`collector_postgres_up` (and `collector_timescaledb_in_use`) are exported, so a scrape never fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from collector.queue import keys
from collector.queue.counters import COUNTERS
from collector.web.health import CONNECTED, HealthSnapshot, age_s, now_us

PREFIX = "collector"


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
        f"{PREFIX}_queue_length", "Envelopes waiting in Redis per table", labels=["table"]
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
    return [queue, inflight, drain, deadletter]


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
    return [stream_age, connection_up]


class SnapshotCollector(Collector):
    """A prometheus_client collector that takes a fresh snapshot on every scrape."""

    def __init__(self, source: Callable[[], HealthSnapshot], clock: Callable[[], int] = now_us) -> None:
        self._source = source
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        snap = self._source()
        return families(snap, self._clock())


def make_registry(source: Callable[[], HealthSnapshot]) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding only the snapshot collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source))
    return registry
