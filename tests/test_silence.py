"""Silence detection's pure rules (`collector.streams.silence`): a connection's and a stream's limits."""

from __future__ import annotations

import pytest

from collector.binance.streams import ConnectionPlan
from collector.streams.silence import (
    SILENCE_EWMA_WEIGHT,
    Pace,
    SilencePolicy,
    clock_driven,
    judge_connection,
    restart_watch,
    silent_streams,
)
from collector.streams.state import ConnectionState, StreamStats

POLICY = SilencePolicy(min_s=5.0, idle_s=300.0)
DEPTH = "btcusdt@depth@100ms"


def paced(frames: int, gap_s: float) -> Pace:
    """A pace that has seen `frames` frames with a usual gap of `gap_s`, the last at t=1000 s."""
    return Pace(1000.0, frames, gap_s)


def test_pace_first_frame_sets_no_gap_then_averages_slowly() -> None:
    """The first frame has no predecessor; each later gap moves the average by its small weight."""
    pace = Pace(0.0)
    pace.observe(10.0)  # ten seconds after the open: not a gap between frames
    assert (pace.frames, pace.gap_s, pace.last_s) == (1, 0.0, 10.0)
    pace.observe(11.0)
    assert pace.gap_s == pytest.approx(SILENCE_EWMA_WEIGHT * 1.0)
    steady = Pace(0.0)
    for index in range(2000):
        steady.observe(index * 0.01)
    assert steady.gap_s == pytest.approx(0.01, rel=1e-3)  # converges on the usual gap


def test_before_warmup_only_the_idle_timeout_applies() -> None:
    """Fewer than the warm-up frames: a fast pace means nothing yet, the limit is WS_IDLE_TIMEOUT_S."""
    pace = paced(99, 0.001)
    assert POLICY.connection_limit_s(pace.frames, pace.gap_s) == 300.0
    assert not judge_connection(POLICY, pace, pace.last_s + 299.9).silent
    assert judge_connection(POLICY, pace, pace.last_s + 300.0).silent


def test_a_busy_connection_is_silent_after_fifty_gaps_but_never_sooner_than_the_minimum() -> None:
    """After warm-up the limit is 50 usual gaps, clamped to [WS_SILENCE_MIN_S, WS_IDLE_TIMEOUT_S]."""
    assert POLICY.connection_limit_s(100, 0.2) == pytest.approx(10.0)  # 50 x 0.2 s
    assert POLICY.connection_limit_s(100, 0.001) == 5.0  # 50 ms would be too eager: the minimum
    assert POLICY.connection_limit_s(100, 60.0) == 300.0  # 50 minutes: the idle timeout caps it
    pace = paced(500, 0.2)
    verdict = judge_connection(POLICY, pace, pace.last_s + 10.5)
    assert verdict.silent and verdict.limit_s == pytest.approx(10.0)
    assert verdict.describe().startswith("silent_s=10.5 usual_gap_s=0.200 limit_s=10.0")


def test_a_connection_never_heard_is_judged_from_its_open() -> None:
    """With no frame at all, the silence runs from the open (Pace starts there)."""
    pace = Pace(50.0)
    assert not judge_connection(POLICY, pace, 349.0).silent
    assert judge_connection(POLICY, pace, 350.0).silent


def test_recheck_comes_when_silence_could_first_be_reached_and_at_least_every_half_minimum() -> None:
    """Not silent: look again at the limit if it is near, else after WS_SILENCE_MIN_S / 2, never < 50 ms."""
    pace = paced(500, 0.2)  # limit 10 s
    assert judge_connection(POLICY, pace, pace.last_s + 9.0).recheck_in_s == pytest.approx(1.0)
    assert judge_connection(POLICY, pace, pace.last_s + 1.0).recheck_in_s == 2.5
    tiny = SilencePolicy(min_s=0.01, idle_s=300.0)
    assert judge_connection(tiny, Pace(0.0), 0.0).recheck_in_s == 0.05


def test_only_clock_driven_streams_can_be_silent_alone() -> None:
    """Diff depth and mark price push on a clock; trades and liquidations follow the market."""
    assert clock_driven("btcusdt@depth@100ms") and clock_driven("btcusdt@depth")
    assert clock_driven("!markPrice@arr@1s") and clock_driven("btcusdt@markPrice")
    assert not clock_driven("btcusdt@aggTrade") and not clock_driven("!forceOrder@arr")


def stats(messages: int = 200, last_us: int | None = 1_000_000_000, gap_us: float = 100_000.0) -> StreamStats:
    return StreamStats(messages=messages, last_message_us=last_us, gap_us=gap_us)


def test_a_quiet_clock_driven_stream_is_silent_after_fifty_of_its_gaps() -> None:
    """A depth stream with a 100 ms pace is silent after 5 s (50 gaps, here also the minimum)."""
    table = {DEPTH: stats()}
    assert silent_streams(POLICY, [DEPTH], table, 1_000_000_000 + 4_999_999, 0) == []
    assert silent_streams(POLICY, [DEPTH], table, 1_000_000_000 + 5_000_000, 0) == [DEPTH]
    slow = {DEPTH: stats(gap_us=1_000_000.0)}  # a 1 s pace: 50 s
    assert silent_streams(POLICY, [DEPTH], slow, 1_000_000_000 + 49_000_000, 0) == []
    assert silent_streams(POLICY, [DEPTH], slow, 1_000_000_000 + 50_000_000, 0) == [DEPTH]


def test_stream_silence_is_measured_from_the_connection_open_at_the_earliest() -> None:
    """A stream that was out with the previous connection gets its chance on the new one."""
    table = {DEPTH: stats()}
    opened_us = 1_000_000_000 + 60_000_000  # a minute after its last event
    assert silent_streams(POLICY, [DEPTH], table, opened_us + 4_000_000, opened_us) == []
    assert silent_streams(POLICY, [DEPTH], table, opened_us + 5_000_000, opened_us) == [DEPTH]


def test_streams_not_judged() -> None:
    """Already reported, never heard, warming up, not clock-driven, not carried: none is reported."""
    later_us = 1_000_000_000 + 3600 * 1_000_000
    reported = stats()
    reported.silenced_at_us = 1
    table = {
        "a@depth": reported,
        "b@depth": stats(last_us=None),
        "c@depth": stats(messages=99),
        "d@aggTrade": stats(),
        "e@depth": stats(),
        "f@depth": stats(),
    }
    carried = ["a@depth", "b@depth", "c@depth", "d@aggTrade", "e@depth", "unknown@depth"]
    assert silent_streams(POLICY, carried, table, later_us, 0) == ["e@depth"]  # f@depth is not carried


def test_restart_watch_forgets_the_pace_of_added_streams_and_reports_of_removed_ones() -> None:
    """A stream back after a delisting is not judged on its old last event; a removed stream is no
    longer reported silent; counters stay, as totals of the run."""
    plan = ConnectionPlan("spot-0", "spot", "spot", "ws://x/stream?streams=a@depth", ("a@depth", "b@depth"))
    state = ConnectionState.from_plan(plan)
    state.stream_stats["a@depth"] = StreamStats(500, 1_000_000, 100_000.0, silenced_at_us=2_000_000)
    state.stream_stats["c@depth"] = StreamStats(300, 1_000_000, 100_000.0, silenced_at_us=3_000_000)
    kept = state.stream_stats["b@depth"] = StreamStats(200, 5_000_000, 50_000.0, silenced_at_us=6_000_000)
    restart_watch(state, ("b@depth", "c@depth"))
    assert state.stream_stats["c@depth"] == StreamStats(300, None, 0.0, None)  # back: pace afresh
    assert state.stream_stats["a@depth"] == StreamStats(500, 1_000_000, 100_000.0, None)  # removed
    assert state.stream_stats["b@depth"] == StreamStats(200, 5_000_000, 50_000.0, 6_000_000) == kept
    restart_watch(state, ("b@depth", "c@depth", "d@depth"))
    assert state.stream_stats["d@depth"] == StreamStats()  # never seen before: created
