"""Event-loop lag of the stream process: a task that sleeps a short period and records the overshoot.

Every receive loop, the sink and the gap ledger share one event loop; a callback that runs for long
delays all of them, and Binance disconnects a client that stops reading (binance.md §7 #6). The
overshoot of a short sleep is how long the loop was held. The longest of the run is published every
second (`collector.queue.loop_lag`); a block past LOOP_BLOCK_WARN_MS logs one WARNING (at most one a
second, counting the others). The WARNING tells the two causes apart by the CPU time this thread
used during the block: most of it means our own code held the loop (`cause=busy`), little of it
means the process was waiting for a core (`cause=starved`: other processes on a busy machine).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Final

import redis
import redis.asyncio

from collector.queue.loop_lag import LoopLag, publish_loop_lag

logger = logging.getLogger(__name__)

LOOP_SAMPLE_S: Final = 0.02  # short enough to see a 100 ms block whole, cheap at 50 wake-ups a second
LOOP_BLOCK_WARN_MS: Final = 100.0
LOOP_PUBLISH_S: Final = 1.0
LOOP_WARN_EVERY_S: Final = 1.0


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class LagStats:
    """The blocks seen so far. Pure: the caller measures, this only keeps the record."""

    warn_ms: float = LOOP_BLOCK_WARN_MS
    max_ms: float = 0.0
    max_cpu_ms: float = 0.0  # the most CPU time the loop's thread used within one block
    over: int = 0
    started_us: int = field(default_factory=now_us)

    def record(self, block_ms: float, cpu_ms: float = 0.0) -> bool:
        """Count one measured block (and the thread's CPU time in it); True past the threshold."""
        if block_ms > self.max_ms:
            self.max_ms = block_ms
        if cpu_ms > self.max_cpu_ms:
            self.max_cpu_ms = cpu_ms
        if block_ms > self.warn_ms:
            self.over += 1
            return True
        return False

    def snapshot(self) -> LoopLag:
        return LoopLag(self.max_ms, self.over, self.warn_ms, self.started_us, now_us(), self.max_cpu_ms)


class LoopLagMonitor:
    """Measures the loop's blocks for as long as `run()` runs; `stats` is readable at any time."""

    def __init__(self, sample_s: float = LOOP_SAMPLE_S, warn_ms: float = LOOP_BLOCK_WARN_MS) -> None:
        self.sample_s = sample_s
        self.stats = LagStats(warn_ms)
        self._next_warning = 0.0
        self._unlogged = 0

    async def run(self, client: redis.asyncio.Redis | None = None, shard: str = "0/1") -> None:
        """Sample until cancelled; publish to Redis (as `shard`'s) every LOOP_PUBLISH_S when a client
        is given."""
        clock, cpu = time.perf_counter, time.thread_time
        publish_at = clock() + LOOP_PUBLISH_S
        while True:
            before, cpu_before = clock(), cpu()
            await asyncio.sleep(self.sample_s)
            after = clock()
            block_ms = max(0.0, (after - before - self.sample_s) * 1000)
            cpu_ms = (cpu() - cpu_before) * 1000
            if self.stats.record(block_ms, cpu_ms):
                self._warn(block_ms, cpu_ms, after)
            if client is not None and after >= publish_at:
                publish_at = after + LOOP_PUBLISH_S
                try:
                    await publish_loop_lag(client, self.stats.snapshot(), shard)
                except (redis.RedisError, OSError, TimeoutError) as error:
                    logger.debug("streams.loop_lag_not_published error=%s", error)

    def _warn(self, block_ms: float, cpu_ms: float, now: float) -> None:
        if now < self._next_warning:
            self._unlogged += 1
            return
        busy = cpu_ms >= block_ms / 2
        logger.warning(
            "streams.loop_blocked block_ms=%.0f cpu_ms=%.0f cause=%s max_ms=%.0f more_since_last=%d hint=%s",
            block_ms,
            cpu_ms,
            "busy" if busy else "starved",
            self.stats.max_ms,
            self._unlogged,
            "too much work per loop turn for this process (fewer streams, or split them over two processes)"
            if busy
            else "the process waited for a CPU: other processes compete for this machine's cores",
        )
        self._unlogged = 0
        self._next_warning = now + LOOP_WARN_EVERY_S
