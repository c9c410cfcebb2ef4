"""The continuous drain: a loop that writes every queue shard with work, and waits on Redis when none has.

Guarantees, beside those of `collector.drain` (nothing lost, nothing stored twice, in-flight
recovery, dead letters, audit ranges in the batch's transaction), which hold because the loop takes
the very same steps (lock, recover, claim, write, acknowledge):
- Work never waits for a beat tick: after each batch the loop looks at every shard again, and an
  idle loop blocks on Redis (`collector.queue.shards.wait_for_work`) until the stream process wakes
  it or DRAIN_IDLE_WAIT_S passes. Nothing is claimed while it waits, so a kill there loses nothing.
- Shards share the loops: a loop goes round the shards with work in turn, one batch each, and holds
  a shard's lock only while a batch of that shard is claimed or being written, so another loop (in
  any process, on any host) takes the shard between two batches; a table's shards drain in parallel.
- At most DRAIN_LOOPS loops run at once, everywhere, and on each worker node at most its pool
  processes less one (`collector.queue.loops`): the pool that runs the alert task always keeps a
  free process.
- `stopping()` (a warm shutdown) ends the loop once the batch being written is committed and
  acknowledged; the loop also ends after DRAIN_LOOP_MAX_S, for a fresh task to take over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final, Literal

import redis
from psycopg2.extensions import connection as Connection

from collector.drain import Drainer, DrainResult, log_summary
from collector.queue import counters, keys
from collector.queue.batches import Batch, BatchQueue
from collector.queue.drain_summary import DrainSummaries
from collector.queue.locks import RedisLock, drain_lock
from collector.queue.loops import LoopSlot, node_most
from collector.queue.shards import Lane, lane_lengths, present_lanes
from collector.settings import Settings

logger = logging.getLogger(__name__)

# How often a loop looks for shard lists beyond QUEUE_SHARDS (a SCAN of the keyspace).
LANE_REFRESH_S: Final = 10.0
# How often a loop adds what it wrote to the shared per-table summaries (`drain.summary`).
SUMMARY_EVERY_S: Final = 5.0

Outcome = Literal["busy", "stopped", "expired", "slot_lost"]


@dataclass
class _Held:
    """A shard this loop holds the lock of, and the batches a dead drain left there."""

    lock: RedisLock
    queue: BatchQueue
    recovered: list[Batch] = field(default_factory=list)


def pick_order(lanes: list[Lane], last: Lane | None) -> list[Lane]:
    """`lanes` starting after `last`, wrapping round: the shards' turn after the one just served. Pure."""
    if last is None or not lanes:
        return list(lanes)
    after = [i for i, lane in enumerate(lanes) if lane > last]
    start = after[0] if after else 0
    return lanes[start:] + lanes[:start]


class DrainLoop:
    """One pool process's drain loop (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        connect: Callable[[], Connection],
        wait: Callable[[float], object],
        stopping: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
        node: str = "",
        pool_processes: int | None = None,
    ) -> None:
        self._settings = settings
        self._node = node  # the Celery worker node, whose pool the loop must not fill
        self._pool_processes = pool_processes
        self._redis = client
        self._connect = connect
        self._wait = wait
        self._stopping = stopping
        self._clock = clock
        self._drainer = Drainer(settings, client, connect, clock)
        self._summaries = DrainSummaries(client)
        self._held: dict[Lane, _Held] = {}
        self._results: dict[str, DrainResult] = {}
        self._lengths: dict[Lane, tuple[int, int]] = {}  # (queued, batches in flight) at the last look
        self._summarised_at = clock()

    def run(self) -> Outcome:
        """Drain until stopped or DRAIN_LOOP_MAX_S; "busy" at once when DRAIN_LOOPS loops already run."""
        ttl_ms = int(self._settings.drain_lock_ttl_s * 1000)
        most = self._settings.drain_loops
        slot = LoopSlot(self._redis, most, ttl_ms, self._node, node_most(self._pool_processes, most))
        if not slot.acquire():
            counters.incr(self._redis, "drain_loop_runs", "busy")
            return "busy"
        counters.incr(self._redis, "drain_loop_runs", "started")
        logger.debug("drain.loop_started member=%s", slot.member)
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="drain-loop") as writer:
                outcome = self._serve(slot, writer)
        finally:
            slot.release()
        logger.debug("drain.loop_ended member=%s outcome=%s", slot.member, outcome)
        return outcome

    def _serve(self, slot: LoopSlot, writer: ThreadPoolExecutor) -> Outcome:
        settings = self._settings
        conn = self._connect()  # before claiming: with PostgreSQL down, nothing moves
        deadline = self._clock() + settings.drain_loop_max_s
        lanes, lanes_at = present_lanes(self._redis, keys.TABLES, settings.queue_shards), self._clock()
        last: Lane | None = None
        pending: tuple[Future[None], Lane] | None = None
        try:
            while True:
                if self._stopping():
                    return "stopped"
                if self._clock() >= deadline:
                    return "expired"
                if not slot.renew():
                    logger.warning(
                        "drain.loop_slot_lost member=%s (expired: was the worker stalled?)", slot.member
                    )
                    return "slot_lost"
                if self._clock() - lanes_at >= LANE_REFRESH_S:
                    lanes, lanes_at = (
                        present_lanes(self._redis, keys.TABLES, settings.queue_shards),
                        self._clock(),
                    )
                found = self._next_batch(lanes, last, pending)
                if found is None:
                    if pending is not None:  # new work may have come meanwhile: look again first
                        self._finish(pending, None)
                        pending = None
                        continue
                    self._summarise(force=False)
                    self._wait(settings.drain_idle_wait_s)
                    continue
                lane, held, batch = found
                parts = self._drainer.parse(lane[0], batch)
                if pending is not None:
                    self._finish(pending, lane)
                    pending = None
                # Still ours? If the lock expired, another drain may be recovering this shard: leave
                # it. The batch just claimed stays in flight for that drain to recover.
                if not held.lock.extend():
                    logger.warning("drain.lock_lost table=%s shard=%d (expired)", lane[0], lane[1])
                    del self._held[lane]
                    continue
                result = self._results.setdefault(lane[0], DrainResult(lane[0]))
                future = self._drainer.submit(writer, conn, held.queue, batch, parts, result)
                pending, last = (future, lane), lane
        finally:
            try:
                if pending is not None:
                    pending[0].result()  # raises again if it failed: the batch stays in flight
            finally:
                # Even after a failed write: its batch stays in flight and the next holder recovers it.
                self._let_go_all()
                self._summarise(force=True)

    def _next_batch(
        self, lanes: list[Lane], last: Lane | None, pending: tuple[Future[None], Lane] | None
    ) -> tuple[Lane, _Held, Batch] | None:
        """The next shard with work whose lock is free (or ours), in turn, and a batch claimed from it."""
        lengths = self._lengths = dict(zip(lanes, lane_lengths(self._redis, lanes), strict=True))
        for lane in pick_order(lanes, last):
            queued, inflight = lengths[lane]
            held = self._held.get(lane)
            # In flight and not ours: a drain died there (or is writing, then its lock turns us away).
            if not (queued or (inflight and held is None) or (held is not None and held.recovered)):
                continue
            if held is None:
                held = self._take(lane)
                if held is None:
                    continue
            if held.recovered:
                return lane, held, held.recovered.pop(0)
            batch = held.queue.claim(self._settings.drain_batch_max_rows)
            if batch is not None:
                return lane, held, batch
            if pending is None or pending[1] != lane:
                self._let_go(lane)
        return None

    def _take(self, lane: Lane) -> _Held | None:
        """Lock a shard and recover what a dead drain left in flight there; None when it is taken."""
        table, shard = lane
        lock = drain_lock(self._redis, table, self._settings.drain_lock_ttl_s, shard)
        if not lock.acquire():
            return None
        queue = BatchQueue(self._redis, table, shard)
        held = self._held[lane] = _Held(lock, queue)
        held.recovered = self._drainer.recover(queue)
        self._results.setdefault(table, DrainResult(table)).recovered += len(held.recovered)
        return held

    def _finish(self, pending: tuple[Future[None], Lane], next_lane: Lane | None) -> None:
        """Wait for the batch being written; give its shard up unless the next batch is from it too."""
        future, lane = pending
        future.result()  # committed and acknowledged (or raises: the batch stays in flight)
        held = self._held.get(lane)
        if lane != next_lane and held is not None and not held.recovered:
            self._let_go(lane)
        self._summarise(force=False)  # the writer is idle: the results are safe to read

    def _let_go(self, lane: Lane) -> None:
        held = self._held.pop(lane)
        if not held.lock.release():
            logger.warning("drain.lock_lost table=%s shard=%d (expired before release)", *lane)

    def _let_go_all(self) -> None:
        for lane in list(self._held):
            self._let_go(lane)

    def _summarise(self, force: bool) -> None:
        """Add what was written since last time to each table's shared summary; call with the writer idle."""
        if not force and self._clock() - self._summarised_at < SUMMARY_EVERY_S:
            return
        self._summarised_at = self._clock()
        now_us = time.time_ns() // 1000
        for result in self._results.values():
            result.remaining = sum(q for (table, _), (q, _) in self._lengths.items() if table == result.table)
            if result.batches:
                log_summary(self._summaries, result, now_us, bool(result.dead_letters or result.recovered))
        self._results = {}
