"""The gap ledger: diff-depth sequence rules, per-symbol resync bookkeeping, and gap records stored
through the real drain (opening and closing records merged in any order)."""

from __future__ import annotations

import re

import pytest
import redis

from collector.db.connection import connect
from collector.db.init import init_db
from collector.drain import Drainer
from collector.gaps.depth import DepthTracker, check
from collector.gaps.records import DepthGap, StreamGap
from collector.queue import keys
from collector.settings import Settings

T = 1_764_000_000_000_000  # µs


@pytest.mark.parametrize(
    ("market", "last_u", "event", "verdict"),
    [
        ("spot", 100, (101, 110, None), "next"),
        ("spot", 100, (95, 105, None), "next"),  # overlaps what was seen, then continues
        ("spot", 100, (90, 100, None), "duplicate"),
        ("spot", 100, (102, 110, None), "break"),
        ("futures", 100, (150, 160, 100), "next"),  # futures ids may jump; only pu links events
        ("futures", 100, (101, 110, 99), "break"),
        ("futures", 100, (120, 130, 110), "break"),
        ("futures", 100, (90, 100, 80), "duplicate"),
    ],
)
def test_binance_sequence_rules(market: str, last_u: int, event: tuple, verdict: str) -> None:
    """Spot: U == previous u + 1; futures: pu == previous u; u not beyond the last is a duplicate."""
    assert check(market, last_u, *event) == verdict


def test_overlapping_connections_deliver_each_event_once() -> None:
    """While two connections carry a stream, the second copy of each event is a duplicate, not a gap."""
    tracker = DepthTracker()
    tracker.on_event("futures", "BTCUSDT", 1, 10, 0, T, "futures-public-0")
    tracker.on_event("futures", "BTCUSDT", 11, 20, 10, T, "futures-public-0#2")  # the replacement, first
    late = tracker.on_event("futures", "BTCUSDT", 11, 20, 10, T, "futures-public-0")  # the old one, second
    assert late.duplicate and late.records == [] and late.fetch == []
    assert not tracker.on_event("futures", "BTCUSDT", 21, 30, 20, T, "futures-public-0").duplicate


def test_a_replacement_ahead_of_the_old_connection_waits_for_it() -> None:
    """During a rotation the new connection may deliver later ids before the old one delivered the
    earlier ones: no gap while the old one is open and catches up; its repeats are duplicates."""
    tracker = DepthTracker()
    tracker.source_opened("spot-0#1")
    tracker.on_event("spot", "BTCUSDT", 1, 10, None, T, "spot-0#1")
    tracker.source_opened("spot-0#2")
    ahead = tracker.on_event("spot", "BTCUSDT", 21, 30, None, T + 1, "spot-0#2")
    assert ahead.records == [] and not ahead.duplicate  # stored, not judged yet
    assert tracker.on_event("spot", "BTCUSDT", 31, 40, None, T + 2, "spot-0#2").records == []
    catching_up = tracker.on_event("spot", "BTCUSDT", 11, 20, None, T + 3, "spot-0#1")
    assert catching_up.records == [] and not catching_up.duplicate
    assert tracker.on_event("spot", "BTCUSDT", 21, 30, None, T + 4, "spot-0#1").duplicate
    assert tracker.source_closed("spot-0#1", T + 5).records == []
    assert tracker.on_event("spot", "BTCUSDT", 41, 50, None, T + 6, "spot-0#2").records == []


def test_an_old_connection_closing_before_it_caught_up_leaves_a_rotation_gap() -> None:
    """If the old connection closes before reaching the replacement's first id, the ids between are a gap."""
    tracker = DepthTracker()
    tracker.source_opened("futures-public-0#1")
    tracker.on_event("futures", "ETHUSDT", 1, 10, 0, T, "futures-public-0#1")
    tracker.source_opened("futures-public-0#2")
    tracker.on_event("futures", "ETHUSDT", 25, 30, 22, T + 1, "futures-public-0#2")
    closed = tracker.source_closed("futures-public-0#1", T + 2)
    assert [(g.cause, g.last_update_id, g.next_update_id) for g in closed.records] == [("rotation", 10, 25)]
    assert closed.fetch == [("futures", "ETHUSDT")]
    assert tracker.on_event("futures", "ETHUSDT", 31, 35, 30, T + 3, "futures-public-0#2").records == []


def test_ids_going_back_on_one_connection_are_a_break() -> None:
    """One connection never repeats itself: an older id there is a reset of the chain, recorded as a gap."""
    tracker = DepthTracker()
    tracker.on_event("spot", "BTCUSDT", 100, 110, None, T, "spot-0")
    decisions = tracker.on_event("spot", "BTCUSDT", 5, 9, None, T + 1, "spot-0")
    assert not decisions.duplicate
    assert [(g.last_update_id, g.next_update_id) for g in decisions.records] == [(110, 5)]


def test_first_event_of_a_recording_is_no_gap() -> None:
    """Nothing was expected before the first event ever seen for a symbol."""
    tracker = DepthTracker()
    decisions = tracker.on_event("spot", "BTCUSDT", 500, 510, None, T)
    assert decisions.records == [] and decisions.fetch == []


def test_break_opens_one_gap_and_one_snapshot_request_for_that_symbol() -> None:
    """A hole opens a gap with its bounds and asks for a snapshot of that symbol only, once."""
    tracker = DepthTracker()
    tracker.on_event("spot", "BTCUSDT", 1, 10, None, T)
    tracker.on_event("spot", "ETHUSDT", 1, 10, None, T)
    decisions = tracker.on_event("spot", "BTCUSDT", 15, 20, None, T + 1)
    assert decisions.records == [DepthGap("spot", "BTCUSDT", T + 1, 10, 15, "sequence")]
    assert decisions.fetch == [("spot", "BTCUSDT")]
    again = tracker.on_event("spot", "BTCUSDT", 30, 40, None, T + 2)  # a second hole, snapshot in flight
    assert [g.next_update_id for g in again.records] == [30] and again.fetch == []
    assert tracker.on_event("spot", "ETHUSDT", 11, 12, None, T + 3).records == []  # untouched


def test_snapshot_that_lines_up_closes_every_open_gap() -> None:
    """Spot: a snapshot L with U <= L+1 <= u in the chain since the hole closes the gaps at once."""
    tracker = DepthTracker()
    tracker.on_event("spot", "BTCUSDT", 1, 10, None, T)
    tracker.on_event("spot", "BTCUSDT", 15, 20, None, T + 1)
    tracker.on_event("spot", "BTCUSDT", 21, 30, None, T + 2)
    decisions = tracker.on_snapshot("spot", "BTCUSDT", 25, T + 3)
    assert [(g.resynced_at_us, g.resync_update_id, g.last_update_id) for g in decisions.records] == [
        (T + 3, 25, 10)
    ]
    assert tracker.open_gaps() == []


def test_snapshot_older_than_the_chain_is_fetched_again() -> None:
    """A snapshot from before the hole's end cannot be synced on: another one is asked for."""
    tracker = DepthTracker()
    tracker.on_event("spot", "BTCUSDT", 1, 10, None, T)
    tracker.on_event("spot", "BTCUSDT", 15, 20, None, T + 1)
    decisions = tracker.on_snapshot("spot", "BTCUSDT", 12, T + 2)
    assert decisions.records == [] and decisions.fetch == [("spot", "BTCUSDT")]
    assert len(tracker.open_gaps()) == 1
    failed = tracker.on_snapshot("spot", "BTCUSDT", None, T + 3)  # the REST call failed
    assert failed.fetch == [("spot", "BTCUSDT")]


@pytest.mark.parametrize(("market", "closing_u"), [("spot", 51), ("futures", 50)])
def test_snapshot_ahead_of_the_diffs_closes_when_the_chain_reaches_it(market: str, closing_u: int) -> None:
    """Spot needs a diff holding L+1; futures one holding L itself (its u may equal lastUpdateId)."""
    futures = market == "futures"
    tracker = DepthTracker()
    tracker.on_event(market, "BTCUSDT", 1, 10, 0 if futures else None, T)
    tracker.on_event(market, "BTCUSDT", 15, 20, 12 if futures else None, T + 1)  # the hole
    assert tracker.on_snapshot(market, "BTCUSDT", 50, T + 2).records == []
    before = tracker.on_event(market, "BTCUSDT", 21, closing_u - 1, 20 if futures else None, T + 3)
    assert before.records == []
    closing = tracker.on_event(
        market, "BTCUSDT", closing_u, closing_u, closing_u - 1 if futures else None, T + 4
    )
    assert [g.resync_update_id for g in closing.records] == [50]


def test_reconnect_is_a_gap_only_when_the_chain_broke() -> None:
    """After a reconnection the first event is checked against the last one: a hole is cause `reconnect`."""
    tracker = DepthTracker()
    tracker.on_event("futures", "BTCUSDT", 1, 10, 0, T)
    tracker.reconnected("futures", ["BTCUSDT"])
    assert tracker.on_event("futures", "BTCUSDT", 12, 20, 10, T + 1).records == []  # nothing missed
    tracker.reconnected("futures", ["BTCUSDT"])
    decisions = tracker.on_event("futures", "BTCUSDT", 40, 50, 35, T + 2)
    assert [(g.cause, g.last_update_id, g.next_update_id) for g in decisions.records] == [
        ("reconnect", 20, 40)
    ]
    later = tracker.on_event("futures", "BTCUSDT", 60, 70, 55, T + 3)
    assert [g.cause for g in later.records] == ["sequence"]


def test_after_a_crash_each_symbol_starts_with_a_gap() -> None:
    """The previous run died: what it last saw is unknown, so each symbol's first event opens a gap."""
    tracker = DepthTracker(after_crash=True)
    decisions = tracker.on_event("spot", "BTCUSDT", 500, 510, None, T)
    assert [(g.cause, g.last_update_id, g.next_update_id) for g in decisions.records] == [
        ("crash", None, 500)
    ]
    assert decisions.fetch == [("spot", "BTCUSDT")]
    assert tracker.on_event("spot", "BTCUSDT", 511, 520, None, T + 1).records == []
    closed = tracker.on_snapshot("spot", "BTCUSDT", 515, T + 2)
    assert [g.resync_update_id for g in closed.records] == [515]


def test_restart_continues_from_the_saved_update_ids() -> None:
    """A restart with the last u of the previous run records a `startup` gap only if ids were missed."""
    tracker = DepthTracker({("spot", "BTCUSDT"): 10, ("spot", "ETHUSDT"): 10})
    assert tracker.on_event("spot", "BTCUSDT", 11, 20, None, T).records == []
    decisions = tracker.on_event("spot", "ETHUSDT", 31, 40, None, T)
    assert [(g.cause, g.last_update_id, g.next_update_id) for g in decisions.records] == [("startup", 10, 31)]


def test_a_restart_stays_startup_when_the_first_connection_opens() -> None:
    """The ledger calls `reconnected` at every open, the first after a restart too: a break there is
    still `startup` (as `make demo` twice on one var/ shows); a later reconnection is `reconnect`."""
    tracker = DepthTracker({("futures", "BTCUSDT"): 5_000})
    tracker.reconnected("futures", ["BTCUSDT"])  # StreamLedger.connection_opened, first open of the run
    first = tracker.on_event("futures", "BTCUSDT", 101, 110, 100, T, source="c1")
    assert [(g.cause, g.last_update_id, g.next_update_id) for g in first.records] == [("startup", 5_000, 101)]
    tracker.chain_lost("futures", ["BTCUSDT"])
    tracker.reconnected("futures", ["BTCUSDT"])
    later = tracker.on_event("futures", "BTCUSDT", 150, 160, 140, T + 1, source="c2")
    assert [(g.cause, g.last_update_id, g.next_update_id) for g in later.records] == [("reconnect", 110, 150)]


def test_ids_that_go_back_after_a_restart_or_reconnect_are_a_break_not_duplicates() -> None:
    """An exchange that restarted numbers its events from lower ids again. Across a restart of the
    collector, or a reconnection, nothing overlaps, so those events are a new chain after a recorded
    gap (and a resync), never "duplicates" dropped for good; within an overlap they still are."""
    restarted = DepthTracker({("futures", "BTCUSDT"): 5_000})
    first = restarted.on_event("futures", "BTCUSDT", 101, 110, 100, T, source="c1")
    assert not first.duplicate
    assert [(g.cause, g.last_update_id, g.next_update_id) for g in first.records] == [("startup", 5_000, 101)]
    assert first.fetch == [("futures", "BTCUSDT")]
    follow = restarted.on_event("futures", "BTCUSDT", 111, 120, 110, T + 1, source="c1")
    assert not follow.duplicate and follow.records == []
    assert restarted.on_snapshot("futures", "BTCUSDT", 115, T + 2).records[0].resync_update_id == 115

    reconnected = DepthTracker()
    reconnected.source_opened("a")
    reconnected.on_event("spot", "ETHUSDT", 1, 900, None, T, source="a")
    reconnected.chain_lost("spot", ["ETHUSDT"])
    reconnected.source_closed("a", T + 1)
    reconnected.reconnected("spot", ["ETHUSDT"])
    reconnected.source_opened("b")
    back = reconnected.on_event("spot", "ETHUSDT", 1, 10, None, T + 2, source="b")
    assert not back.duplicate and [g.cause for g in back.records] == ["reconnect"]
    assert reconnected.on_event("spot", "ETHUSDT", 11, 20, None, T + 3, source="b") is not None

    # A replacement that lags behind the connection it replaces: its old events are repeats.
    overlap = DepthTracker()
    overlap.source_opened("old")
    overlap.on_event("spot", "BNBUSDT", 1, 100, None, T, source="old")
    overlap.source_opened("new")
    overlap.reconnected("spot", ["BNBUSDT"])  # the ledger says so for every opening, a handover too
    assert overlap.on_event("spot", "BNBUSDT", 91, 95, None, T + 1, source="new").duplicate


def _rows(settings: Settings, sql: str) -> list[tuple]:
    conn = connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def test_gap_records_merge_in_the_database(settings_each_mode: Settings, redis_conn: redis.Redis) -> None:
    """Opening and closing records of a gap become one row, in one batch or two, in any order, replayed."""
    settings = settings_each_mode
    init_db(settings)
    drainer = Drainer(settings, redis_conn, lambda: connect(settings))
    opened = DepthGap("futures", "BTCUSDT", T, 10, 40, "reconnect")
    closed = DepthGap("futures", "BTCUSDT", T, 10, 40, "reconnect", T + 2_000_000, 55)
    other = DepthGap("spot", "ETHUSDT", T + 5, 7, 9, "sequence")
    redis_conn.rpush(keys.queue("depth_gaps"), opened.envelope(), closed.envelope(), other.envelope())
    drainer.drain("depth_gaps")
    redis_conn.rpush(keys.queue("depth_gaps"), opened.envelope())  # a late replay of the opening record
    drainer.drain("depth_gaps")
    rows = _rows(
        settings,
        "SELECT market, symbol, last_update_id, next_update_id, resync_update_id, cause,"
        " extract(epoch FROM resynced_at - detected_at) FROM depth_gaps ORDER BY market",
    )
    assert rows == [
        ("futures", "BTCUSDT", 10, 40, 55, "reconnect", 2),
        ("spot", "ETHUSDT", 7, 9, None, "sequence", None),
    ]

    out = StreamGap("spot", "btcusdt@aggTrade", T, "disconnect", "spot-0")
    back = StreamGap("spot", "btcusdt@aggTrade", T, "disconnect", "spot-0", T + 1_500_000)
    redis_conn.rpush(keys.queue("stream_gaps"), back.envelope())  # the close arrives first
    drainer.drain("stream_gaps")
    redis_conn.rpush(keys.queue("stream_gaps"), out.envelope())
    drainer.drain("stream_gaps")
    assert _rows(
        settings,
        "SELECT stream, cause, connection, extract(epoch FROM ended_at - started_at) FROM stream_gaps",
    ) == [("btcusdt@aggTrade", "disconnect", "spot-0", 1.5)]


def test_health_fails_on_a_depth_gap_left_unsynced() -> None:
    """A depth gap waiting over HEALTH_MAX_GAP_OPEN_S for its snapshot fails /health; all are listed."""
    from collector.settings import load_settings
    from collector.web.health import HealthSnapshot, OpenGap, assess
    from collector.web.metrics import families

    now = T + 600_000_000
    snap = HealthSnapshot(
        redis_up=True,
        postgres_up=True,
        open_gaps=[
            OpenGap("depth", "futures", "BTCUSDT", now - 121_000_000, "reconnect"),
            OpenGap("depth", "spot", "ETHUSDT", now - 5_000_000, "sequence"),
            OpenGap("stream", "spot", "btcusdt@aggTrade", now - 300_000_000, "disconnect"),
        ],
    )
    report = assess(snap, now, load_settings(health_max_gap_open_s=120))
    gap_reasons = [r for r in report.reasons if r.startswith("depth gap")]
    assert gap_reasons == [
        "depth gap futures BTCUSDT (reconnect) open for 121s (max 120s): its resync snapshot is not stored"
    ]
    assert [g["name"] for g in report.body["open_gaps"]] == ["BTCUSDT", "ETHUSDT", "btcusdt@aggTrade"]
    gauge = next(m for m in families(snap, now) if m.name == "collector_open_gaps")
    assert {s.labels["kind"]: s.value for s in gauge.samples} == {"depth": 2, "stream": 1}


def test_collector_gaps_lists_both_kinds_with_durations(settings: Settings, redis_conn: redis.Redis) -> None:
    """`collector gaps` prints depth gaps and outages with their durations, filtered by market/symbol."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    now_us = time.time_ns() // 1000
    init_db(settings)
    drainer = Drainer(settings, redis_conn, lambda: connect(settings))
    redis_conn.rpush(
        keys.queue("depth_gaps"),
        DepthGap(
            "spot", "BTCUSDT", now_us - 60_000_000, 10, 15, "sequence", now_us - 59_500_000, 20
        ).envelope(),
        DepthGap("futures", "ETHUSDT", now_us - 30_000_000, 7, 9, "reconnect").envelope(),
    )
    redis_conn.rpush(
        keys.queue("stream_gaps"),
        StreamGap(
            "spot", "btcusdt@aggTrade", now_us - 50_000_000, "disconnect", "spot-0", now_us - 48_750_000
        ).envelope(),
    )
    drainer.drain("depth_gaps")
    drainer.drain("stream_gaps")
    collector = str(Path(sys.executable).with_name("collector"))
    everything = subprocess.run([collector, "gaps"], capture_output=True, text=True, timeout=60)
    assert everything.returncode == 0, everything.stderr
    lines = everything.stdout.splitlines()
    assert lines[0].split() == [
        "KIND",
        "MARKET",
        "SYMBOL/STREAM",
        "STARTED",
        "(UTC)",
        "DURATION",
        "CAUSE",
        "DETAIL",
    ]
    assert "0.500 s" in lines[1] and "u 10 -> U 15, resync at 20" in lines[1]
    assert "btcusdt@aggTrade" in lines[2] and "1.250 s" in lines[2] and "spot-0" in lines[2]
    assert "ETHUSDT" in lines[3] and re.search(r"open 3\d s", lines[3])
    assert lines[-1] == "2 depth gaps, 1 stream outages, 1 open"
    spot_btc = subprocess.run(
        [collector, "gaps", "--market", "spot", "--symbol", "btcusdt"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert spot_btc.stdout.splitlines()[-1] == "1 depth gaps, 1 stream outages, 0 open"


def test_a_second_depth_speed_of_a_symbol_is_stored_but_not_judged() -> None:
    """`@depth` beside `@depth@100ms`: the slower stream batches differently; no false gap, none dropped."""
    import redis.asyncio

    from collector.streams.ledger import GapLedger
    from collector.streams.sink import Sink, SinkOptions

    async def never(market: str, symbol: str) -> None:
        return None

    sink = Sink(redis.asyncio.Redis(), SinkOptions(0.05, 10_000, 1_000_000), run="r1")
    ledger = GapLedger(sink, never)
    fast, slow = "btcusdt@depth@100ms", "btcusdt@depth"
    stored = [
        ledger.on_depth("spot", fast, {"s": "BTCUSDT", "U": 1, "u": 10}, T, "spot-0#1"),
        ledger.on_depth("spot", slow, {"s": "BTCUSDT", "U": 1, "u": 30}, T, "spot-0#1"),
        ledger.on_depth("spot", fast, {"s": "BTCUSDT", "U": 11, "u": 20}, T, "spot-0#1"),
        ledger.on_depth("spot", fast, {"s": "BTCUSDT", "U": 21, "u": 30}, T, "spot-0#1"),
        ledger.on_depth("spot", slow, {"s": "BTCUSDT", "U": 31, "u": 60}, T, "spot-0#1"),
    ]
    assert stored == [True] * 5
    assert ledger.tracker.open_gaps() == [] and sink.buffered_envelopes("depth_gaps") == []
