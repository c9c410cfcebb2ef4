"""Backpressure: how much the Redis lists hold, what goes to the spill instead, and feeding it back.

The sink asks `Backpressure` where each flush goes. A list's envelopes go to Redis while the lists
this process writes hold less than REDIS_MAX_QUEUE_BYTES; past it, the rest of the flush goes to the
spill on disk (`collector.streams.spill`), and so does every newer envelope of a list while any of
that list's envelopes wait on disk, so none overtakes an older one. Once the lists are below
RESUME_FRACTION of the cap, the spill is fed back, oldest first, in bounded pipelines.

What the lists hold is estimated, never measured per flush: each list's length (the reply of every
RPUSH, and an LLEN of each list every QUEUE_REFRESH_S) times the running mean size of its envelopes.
The same lengths give the drains' recent pace (envelopes leaving the lists per second), published with
the spill figures (`collector.queue.spill_stats`) for the estimated time to drain.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import redis.asyncio

from collector.queue import keys, shards, spill_stats
from collector.queue.spill_stats import SpillFigures
from collector.streams.spill import Groups, Spill
from collector.streams.spill_format import group_by_key

logger = logging.getLogger(__name__)

# Feeding back starts below this share of the cap, so the lists have room for what keeps arriving
# before the cap is met again (no flapping between spilling and feeding).
RESUME_FRACTION: Final = 0.8
# One feed-back pipeline: small enough that its read, parse and MULTI never hold the loop or
# Redis for long (~2 MB is a few ms each).
FEED_MAX_BYTES: Final = 2 * 1024 * 1024
FEED_MAX_RECORDS: Final = 5000
QUEUE_REFRESH_S: Final = 1.0
# ... and this often near the cap or while envelopes wait on disk.
FEEDING_REFRESH_S: Final = 0.05
SIZE_SAMPLE: Final = 32  # envelopes per list and flush whose sizes feed the running mean
SIZE_WEIGHT: Final = 0.2  # weight of a new sample in the running mean size
DEFAULT_ENVELOPE_BYTES: Final = 350.0  # before a list's first sample: an aggTrade envelope's size
RATE_HORIZON_S: Final = 10.0  # the drain pace is a moving average over about this long


class QueueGauge:
    """Lengths and mean envelope sizes of the lists this process writes; the drains' pace. Pure."""

    def __init__(self) -> None:
        self.lengths: dict[str, int] = {}
        self.sizes: dict[str, float] = {}
        self.drain_rate = 0.0
        self._pushed: Counter[str] = Counter()  # since the last refresh
        self._at_refresh: dict[str, int] = {}
        self._refreshed_at: float | None = None

    def size(self, key: str) -> float:
        return self.sizes.get(key, DEFAULT_ENVELOPE_BYTES)

    def sample(self, key: str, envelopes: Sequence[bytes]) -> None:
        if envelopes:
            mean = sum(map(len, envelopes)) / len(envelopes)
            old = self.sizes.get(key)
            self.sizes[key] = mean if old is None else old + SIZE_WEIGHT * (mean - old)

    def total_bytes(self) -> float:
        return sum(length * self.size(key) for key, length in self.lengths.items())

    def pushed(self, key: str, count: int, length: int) -> None:
        """`count` envelopes were pushed to `key`, which then held `length` (RPUSH's reply)."""
        self.lengths[key] = length
        self._pushed[key] += count

    def refreshed(self, lengths: Mapping[str, int], now: float) -> None:
        """Every list's length read at `now` (monotonic s): what left since the last read is drained."""
        if self._refreshed_at is not None and now > self._refreshed_at:
            left = sum(
                max(0, self._at_refresh.get(key, length) + self._pushed[key] - length)
                for key, length in lengths.items()
            )
            elapsed = now - self._refreshed_at
            weight = 1 - math.exp(-elapsed / RATE_HORIZON_S)
            self.drain_rate += weight * (left / elapsed - self.drain_rate)
        self.lengths.update(lengths)
        self._at_refresh = dict(lengths)
        self._pushed.clear()
        self._refreshed_at = now


def split(
    wanted: Mapping[str, int], held: Mapping[str, int], sizes: Mapping[str, float], room_bytes: float
) -> dict[str, int]:
    """How many of each list's oldest `wanted` envelopes go to Redis; the rest go to disk. Pure.

    A list with envelopes on disk (`held`) sends none; the others fill `room_bytes` in turn.
    """
    to_redis: dict[str, int] = {}
    for key, count in wanted.items():
        if held.get(key, 0) > 0:
            to_redis[key] = 0
            continue
        fits = count if room_bytes >= count * sizes[key] else max(0, int(room_bytes // sizes[key]))
        to_redis[key] = fits
        room_bytes -= fits * sizes[key]
    return to_redis


class Backpressure:
    """The sink's cap on Redis and its spill; every method is called from the sink's task only."""

    def __init__(self, spill: Spill | None, cap_bytes: int, shard: str = "0/1") -> None:
        self.spill = spill
        self.cap_bytes = cap_bytes
        self.shard = shard  # the stream shard's label: its own spill hashes in Redis (keys.spill)
        self.gauge = QueueGauge()
        self._opened = False
        self._next_refresh = 0.0
        self._published_empty = False
        self._write_failed = False

    def open(self) -> None:
        """Take the spill directory and what earlier runs left there (once)."""
        if self.spill is not None and not self._opened:
            self.spill.open()
            self._opened = True

    def close(self) -> None:
        if self.spill is not None and self._opened:
            self.spill.close()
            self._opened = False

    def watch(self, names: Iterable[str]) -> None:
        """Count these lists from the next length refresh on, before anything is pushed to them."""
        for name in names:
            self.gauge.lengths.setdefault(name, 0)

    # --- routing a flush -----------------------------------------------------------------------------

    def route(self, wanted: Mapping[str, tuple[int, Sequence[bytes]]]) -> dict[str, int]:
        """Of each list's `(count, envelopes)`, how many go to Redis now (the rest to disk)."""
        for key, (_count, envelopes) in wanted.items():
            self.gauge.sample(key, envelopes[:SIZE_SAMPLE])
        counts = {key: count for key, (count, _) in wanted.items()}
        if self.spill is None:
            return counts
        sizes = {key: self.gauge.size(key) for key in wanted}
        return split(counts, self.spill.held, sizes, self.cap_bytes - self.gauge.total_bytes())

    async def spill_groups(self, groups: Groups) -> bool:
        """Write `groups` to disk; False (logged once per episode) when the disk refuses them."""
        assert self.spill is not None
        self.open()
        try:
            await self.spill.append(groups)
        except OSError as error:
            if not self._write_failed:
                logger.error(
                    "spill.write_failed dir=%s envelopes=%d error=%s (kept in memory; free disk space)",
                    self.spill.directory,
                    groups.envelopes,
                    error,
                )
            self._write_failed = True
            return False
        if self._write_failed:
            logger.warning("spill.write_recovered dir=%s", self.spill.directory)
            self._write_failed = False
        return True

    # --- what Redis is told --------------------------------------------------------------------------

    def figures(self) -> SpillFigures:
        spill = self.spill
        free = None
        if spill is not None:
            try:
                free = shutil.disk_usage(spill.directory).free
            except OSError:
                free = None
        return SpillFigures(
            envelopes=spill.envelopes if spill else 0,
            bytes=spill.disk_bytes if spill else 0,
            segments=spill.segments if spill else 0,
            oldest_us=spill.oldest_us if spill else None,
            spilling=bool(spill and spill.held),
            queue_bytes=int(self.gauge.total_bytes()),
            cap_bytes=self.cap_bytes,
            drain_rate=self.gauge.drain_rate,
            disk_free_bytes=free,
            updated_us=time.time_ns() // 1000,
        )

    def publish(self, pipe: Any, always: bool = False, queued: Mapping[str, int] | None = None) -> None:
        """Add the spill figures to `pipe` while anything is (or just was) on disk, or when `always`;
        with the audit numbers `queued` (`<run>/<table>` -> last number in Redis or on disk), if given."""
        spill = self.spill
        if spill is None:
            return
        empty = not spill.held and not spill.segments
        if empty and self._published_empty and not always:
            return
        if queued:
            pipe.hset(keys.AUDIT_QUEUED, mapping=dict(queued))
        spill_stats.publish(pipe, self.shard, self.figures(), dict(spill.pending))
        spill_stats.raise_queued(pipe, spill.recovered_seq)
        self._published_empty = empty

    async def refresh_if_due(self, client: redis.asyncio.Redis, queued: Mapping[str, int]) -> None:
        """Every QUEUE_REFRESH_S (FEEDING_REFRESH_S while anything is on disk): read every list's
        length and publish the figures (one round trip)."""
        now = time.monotonic()
        if now < self._next_refresh:
            return
        # Close to the cap, or with envelopes on disk, the lengths are followed closely: feeding back
        # and going back to Redis then wait for the drains by no more than this.
        near = self.gauge.total_bytes() > self.cap_bytes * RESUME_FRACTION
        self._next_refresh = now + (
            FEEDING_REFRESH_S if near or (self.spill and self.spill.held) else QUEUE_REFRESH_S
        )
        names = sorted(set(self.gauge.lengths) | (set(self.spill.held) if self.spill else set()))
        pipe: Any = client.pipeline(transaction=True)
        for name in names:
            pipe.llen(name)
        self.publish(pipe, always=True, queued=queued)
        replies = await pipe.execute()
        self.gauge.refreshed(dict(zip(names, (int(r) for r in replies[: len(names)]), strict=True)), now)
        if self.spill is not None:
            self.spill.recovered_seq.clear()  # raised once; the numbers on disk never grow

    # --- feeding back --------------------------------------------------------------------------------

    def feed_ready(self) -> bool:
        """Whether envelopes wait on disk and the lists have room for a pipeline of them."""
        if self.spill is None or not self.spill.held:
            return False
        room = self.cap_bytes * RESUME_FRACTION - self.gauge.total_bytes()
        return room >= min(FEED_MAX_BYTES, self.cap_bytes * RESUME_FRACTION) / 4

    async def feed(self, client: redis.asyncio.Redis, queued: Mapping[str, int]) -> int:
        """Move the oldest envelopes on disk to their lists (one MULTI); returns how many."""
        if not self.feed_ready():
            return 0
        assert self.spill is not None
        room = self.cap_bytes * RESUME_FRACTION - self.gauge.total_bytes()
        chunk = await self.spill.read(int(min(FEED_MAX_BYTES, max(room, 1))), FEED_MAX_RECORDS)
        if chunk is None:
            return 0
        grouped = group_by_key(chunk.records)
        pipe: Any = client.pipeline(transaction=True)
        for key, envelopes in grouped.items():
            pipe.rpush(key, *envelopes)
        shards.wake(pipe)  # after the pushes: their replies come first (zipped below)
        # The figures after this chunk: moved off the disk in the same transaction as onto the lists.
        self.spill.take(chunk)
        try:
            self.publish(pipe, always=True, queued=queued)
            replies = await pipe.execute()
        except BaseException:
            self.spill.untake(chunk)
            raise
        self.spill.ack(chunk)
        for (key, envelopes), length in zip(grouped.items(), replies, strict=False):
            self.gauge.sample(key, envelopes[:SIZE_SAMPLE])
            self.gauge.pushed(key, len(envelopes), int(length))
        return len(chunk.records)
