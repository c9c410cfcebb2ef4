"""Health judging and rendering, pure: facts and a time in, reasons (and the /health body) out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from collector.audit import Loss
from collector.queue.connections import ConnectionRecord
from collector.web.health_facts import HealthSnapshot, OpenGap, TableState, age_s
from collector.web.health_judge import connection_reasons, gap_reasons, judge, loss_reasons, queue_reasons
from collector.web.health_render import health_json

S = 1_000_000  # µs per second
NOW = 1_800_000_000 * S


@dataclass(frozen=True)
class Limits:
    health_max_message_age_s: float = 60
    health_max_drain_age_s: float = 30
    health_max_gap_open_s: float = 120


def _up(**changes: object) -> HealthSnapshot:
    snap = HealthSnapshot(
        redis_up=True,
        postgres_up=True,
        connections=[ConnectionRecord("spot-0", "spot", "spot", state="connected", last_message_us=NOW - S)],
    )
    for name, value in changes.items():
        setattr(snap, name, value)
    return snap


def test_a_healthy_snapshot_has_no_reason() -> None:
    """Both services up, a connection receiving and nothing waiting: no reason at all."""
    assert judge(_up(), NOW, Limits()) == []


def test_services_come_first_and_a_database_in_the_wrong_mode_is_a_reason() -> None:
    """Redis, then PostgreSQL or its mode; a database detail is only judged while PostgreSQL answers."""
    wrong_mode = {"mode": "plain", "ok": False, "detail": "TimescaleDB required but not installed"}
    assert judge(_up(database=wrong_mode), NOW, Limits()) == [
        "database: TimescaleDB required but not installed"
    ]
    both_down = _up(redis_up=False, redis_error="R down", postgres_up=False, postgres_error="P down")
    assert judge(both_down, NOW, Limits()) == ["R down", "P down"]


def test_a_clock_behind_the_writer_never_makes_ages_negative() -> None:
    """A last message stamped after `now` (two machines' clocks) is age 0, not a negative age."""
    assert age_s(NOW + 5 * S, NOW) == 0.0
    future = [ConnectionRecord("f", state="connected", last_message_us=NOW + 5 * S)]
    assert connection_reasons(future, NOW, 60) == []


def test_queue_reasons_count_batches_in_flight_too() -> None:
    """A drain that died mid-batch leaves envelopes in flight: they count as waiting."""
    tables = [TableState("agg_trades", 2, 5, NOW - 40 * S), TableState("mark_prices", 0, 0, None)]
    assert queue_reasons(tables, NOW, 30) == ["queue agg_trades: 7 waiting, last drain 40s ago (max 30s)"]


def test_only_depth_gaps_left_open_too_long_are_reasons() -> None:
    """A depth chain unsynced past the limit is a reason; a young one or a stream outage is not."""
    gaps = [
        OpenGap("depth", "spot", "BTCUSDT", NOW - 121 * S, "sequence"),
        OpenGap("depth", "spot", "ETHUSDT", NOW - 10 * S, "sequence"),
        OpenGap("stream", "futures", "!forceOrder@arr", NOW - 3600 * S, "disconnect"),
    ]
    (reason,) = gap_reasons(gaps, NOW, 120)
    assert reason.startswith("depth gap spot BTCUSDT (sequence) open for 121s (max 120s)")


def test_lost_events_are_reasons_whatever_else_is_known() -> None:
    """Envelopes lost between Redis and PostgreSQL are reported even while Redis is down."""
    after, before = datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, 0, 1, tzinfo=UTC)
    snap = _up(redis_up=False, redis_error="R down", losses=[Loss("agg_trades", "r1", 5, 7, after, before)])
    (line,) = loss_reasons(snap)
    assert line.startswith("lost 3 agg_trades events received between 2027-01-01T00:00:00+00:00")
    assert judge(snap, NOW, Limits()) == ["R down", line]


def test_the_body_carries_the_verdict_and_every_fact() -> None:
    """`/health`'s body is JSON-ready and says healthy exactly when there is no reason."""
    snap = _up(tables=[TableState("agg_trades", 1, 0, NOW - 2 * S)], deadletter_length=4)
    body = health_json(snap, NOW, ["something"])
    assert (body["healthy"], body["reasons"], body["deadletter_length"]) == (False, ["something"], 4)
    assert body["tables"] == [
        {"table": "agg_trades", "queue_length": 1, "inflight_length": 0, "last_drain_age_s": 2.0}
    ]
    assert health_json(snap, NOW, [])["healthy"] is True
    json.dumps(body)
