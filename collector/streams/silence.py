"""Silence detection, pure: when a connection, or one stream on it, has been quiet for too long.

A Binance socket can stop delivering without closing (binance.md §7 #5), so silence is judged from
the data itself. A connection's usual pace is a slow moving average of the gap between its frames;
it is silent after SILENCE_FACTOR of those gaps, never sooner than WS_SILENCE_MIN_S and never later
than WS_IDLE_TIMEOUT_S. Until SILENCE_WARMUP_FRAMES have arrived the average means little and only
WS_IDLE_TIMEOUT_S applies. A stream that pushes on a clock (diff depth, mark price) is judged the same
way on its own pace, so it can be resubscribed while the rest of its connection goes on.

Nothing here reads a clock, sleeps or sends: the caller passes the times in (monotonic seconds for a
connection, epoch µs for a stream, as `ConnectionState` keeps them) and acts on the answer
(`collector.streams.connection` closes the socket or resubscribes the stream).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from collector.streams.state import ConnectionState, StreamStats

# A connection is silent after this many of its usual gaps between frames.
SILENCE_FACTOR: Final = 50.0
# Weight of the newest gap in the moving averages, a connection's (`Pace`) and each stream's (the
# frame handler keeps `StreamStats.gap_us`): slow, so one burst or lull barely moves them.
SILENCE_EWMA_WEIGHT: Final = 0.01
# Frames (or a stream's events) before its average is trusted.
SILENCE_WARMUP_FRAMES: Final = 100
# The watchdog looks at least every WS_SILENCE_MIN_S / 2, and never more often than this.
MIN_CHECK_INTERVAL_S: Final = 0.05


@dataclass(frozen=True, slots=True)
class SilencePolicy:
    """The bounds of silence, from WS_SILENCE_MIN_S and WS_IDLE_TIMEOUT_S."""

    min_s: float
    idle_s: float
    factor: float = SILENCE_FACTOR
    warmup_frames: int = SILENCE_WARMUP_FRAMES

    def connection_limit_s(self, frames: int, gap_s: float) -> float:
        """Seconds without a frame after which a connection with this pace is silent."""
        if frames < self.warmup_frames:
            return self.idle_s
        return min(self.idle_s, max(self.min_s, self.factor * gap_s))

    def stream_limit_us(self, gap_us: float) -> float:
        """µs without an event after which a clock-driven stream with this usual gap is silent.

        Not capped by WS_IDLE_TIMEOUT_S: a stream silent that long on a live connection is resubscribed
        all the same, and the cap is the connection's business.
        """
        return max(self.min_s * 1e6, self.factor * gap_us)


@dataclass(slots=True)
class Pace:
    """A connection's frames so far, the time of the last, and the usual gap between them (seconds).

    `last_s` starts at the open, so a connection that never delivers is judged from then.
    """

    last_s: float
    frames: int = 0
    gap_s: float = 0.0

    def observe(self, now_s: float) -> None:
        """One frame arrived at `now_s` (the first one sets no gap: there is no previous frame)."""
        if self.frames:
            self.gap_s += (now_s - self.last_s - self.gap_s) * SILENCE_EWMA_WEIGHT
        self.last_s = now_s
        self.frames += 1


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the watchdog learns at one look: silent or not, by how much, and when to look again."""

    silent: bool
    silent_s: float
    limit_s: float
    usual_gap_s: float
    recheck_in_s: float

    def describe(self) -> str:
        """The log fields that explain a silence close."""
        return f"silent_s={self.silent_s:.1f} usual_gap_s={self.usual_gap_s:.3f} limit_s={self.limit_s:.1f}"


def judge_connection(policy: SilencePolicy, pace: Pace, now_s: float) -> Verdict:
    """Is the connection with `pace` silent at `now_s`? If not, look again when it could first be,
    and at least every WS_SILENCE_MIN_S / 2 (its pace, and so its limit, may change meanwhile)."""
    limit_s = policy.connection_limit_s(pace.frames, pace.gap_s)
    silent_s = now_s - pace.last_s
    recheck_s = min(limit_s - silent_s, max(policy.min_s / 2, MIN_CHECK_INTERVAL_S))
    return Verdict(silent_s >= limit_s, silent_s, limit_s, pace.gap_s, recheck_s)


def restart_watch(state: ConnectionState, streams: tuple[str, ...]) -> None:
    """Before `state` carries `streams` instead of its current ones: an added stream's pace starts
    afresh (one back after a delisting would otherwise look silent since its old last event), and a
    removed one is no longer reported silent. Counters stay: they are totals of this run."""
    before = state.streams
    for name in set(streams).difference(before):
        stats = state.stats_for(name)
        stats.last_message_us, stats.gap_us, stats.silenced_at_us = None, 0.0, None
    for name in set(before).difference(streams):
        gone = state.stream_stats.get(name)
        if gone is not None:
            gone.silenced_at_us = None


def clock_driven(stream: str) -> bool:
    """Streams that push on a clock (diff depth, mark price). A quiet market leaves trade and
    liquidation streams silent for minutes, and that is no outage."""
    return "@depth" in stream or "markPrice" in stream


def silent_streams(
    policy: SilencePolicy,
    streams: Iterable[str],
    stats: Mapping[str, StreamStats],
    now_us: int,
    since_us: int,
) -> list[str]:
    """The clock-driven `streams` quiet at `now_us` for SILENCE_FACTOR of their usual gaps, in order.

    Quiet is measured from `since_us` at the earliest (the connection's open): a stream that was out
    with the previous connection is that connection's outage, already recorded, and gets its chance
    on this one. A stream already reported (`silenced_at_us`), never heard, or still warming up is
    not judged.
    """
    found: list[str] = []
    for stream in streams:
        stream_stats = stats.get(stream)
        if stream_stats is None or stream_stats.silenced_at_us is not None:
            continue
        last_us = stream_stats.last_message_us
        if last_us is None or not clock_driven(stream) or stream_stats.messages < policy.warmup_frames:
            continue
        if now_us - max(last_us, since_us) >= policy.stream_limit_us(stream_stats.gap_us):
            found.append(stream)
    return found
