"""The sink: buffers envelopes per table and writes them to Redis in one pipeline per flush.

Guarantees:
- `push()` never waits and never touches the network: the receive loops only append here.
- Everything pushed is kept until a flush that contains it has been committed to Redis or to the
  spill on disk (collector.streams.pressure): nothing received is dropped. Past REDIS_MAX_QUEUE_BYTES
  in the lists, and past STREAM_BUFFER_MAX_EVENTS in memory while Redis is unreachable, envelopes go
  to disk, so neither Redis nor this process grows without bound.
- Order within a list is kept: one flush runs at a time and always takes the oldest envelopes, and
  while any envelope of a list waits on disk, newer ones of that list go to disk behind it. A table
  has one list per queue shard; an event goes to the shard of its stream's symbol (QUEUE_SHARDS,
  collector.queue.shards).
- A flush is one MULTI/EXEC transaction, so a flush cut off by a Redis failure writes nothing and is
  retried whole. (If the connection dies after EXEC ran but before its reply arrived, the retry writes
  those envelopes a second time; the tables' natural keys make such duplicates harmless.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import redis
import redis.asyncio

from collector.queue import counters, deadletter, keys, shards
from collector.queue.deadletter import DeadLetter
from collector.queue.envelope import make_envelope
from collector.queue.keys import shard_run
from collector.queue.shards import Lane, shard_of_stream
from collector.queue.stream_stats import StreamStatsWriter
from collector.retry import is_transient
from collector.settings import Settings
from collector.streams.backoff import backoff_delays
from collector.streams.pressure import Backpressure
from collector.streams.shard import parse_shard, spill_dir
from collector.streams.spill import Groups, Spill
from collector.streams.state import ConnectionState

logger = logging.getLogger(__name__)

# Retry pace while Redis is down: fast enough to notice a restart within seconds, slow enough not
# to spin on a dead socket.
REDIS_RETRY_INITIAL_S: Final = 0.2
REDIS_RETRY_MAX_S: Final = 5.0
# Errors that mean "Redis cannot take this now": keep the batch and try again later.
REDIS_ERRORS: Final = (redis.RedisError, OSError, TimeoutError)
# One flush takes at most this many envelopes per table: a backlog (after an outage, or when the
# receive loops outrun the flush interval) goes out in large pipelines, each still small enough
# (~30 MB) not to block Redis or this process for long.
MAX_EVENTS_PER_TABLE_PER_FLUSH: Final = 100_000


@dataclass(frozen=True)
class SinkOptions:
    flush_interval_s: float
    flush_max_events: int
    buffer_warn_events: int
    buffer_max_events: int = 100_000
    max_queue_bytes: int = 512 * 1024 * 1024
    spill_dir: Path | None = None  # None: no spill, everything waits in memory for Redis
    queue_shards: int = 1
    stream_shard: str = "0/1"  # this process's shard label (STREAM_SHARD): names its spill hashes

    @classmethod
    def from_settings(cls, settings: Settings) -> SinkOptions:
        shard = parse_shard(settings.stream_shard)
        return cls(
            flush_interval_s=settings.stream_flush_interval_ms / 1000,
            flush_max_events=settings.stream_flush_max_events,
            buffer_warn_events=settings.stream_buffer_warn_events,
            buffer_max_events=settings.stream_buffer_max_events,
            max_queue_bytes=settings.redis_max_queue_bytes,
            spill_dir=spill_dir(settings.spill_dir, shard),
            queue_shards=settings.queue_shards,
            stream_shard=shard.label,
        )


@dataclass
class _Batch:
    """What one flush attempt writes; committed to the bookkeeping only after EXEC succeeded."""

    envelopes: dict[Lane, int]  # (table, shard) -> how many of its oldest envelopes go to Redis
    deadletters: int
    streams: list[tuple[ConnectionState, str, int, int | None]]  # state, stream, messages, last_us
    reconnects: list[tuple[str, int]]  # connection id, reconnects so far
    states: dict[str, bytes]  # connection id -> JSON
    # (table, shard) -> how many envelopes after those go to the spill (once Redis took its part)
    spilled: dict[Lane, int] = field(default_factory=dict)

    @property
    def events(self) -> int:
        return sum(self.envelopes.values()) + self.deadletters

    def is_empty(self) -> bool:
        parts = (self.envelopes, self.deadletters, self.streams, self.reconnects, self.states, self.spilled)
        return not any(parts)


class Sink:
    """Buffers envelopes in memory and moves them to the Redis lists of their tables."""

    def __init__(self, client: redis.asyncio.Redis, options: SinkOptions, run: str | None = None) -> None:
        self._client = client
        self._options = options
        self._queues: dict[Lane, list[bytes]] = {}
        self._deadletters: list[DeadLetter] = []
        self._buffered = 0
        self._states: dict[str, ConnectionState] = {}
        self._written_states: dict[str, bytes] = {}
        self._written_streams: dict[tuple[str, str], int] = {}
        self._written_reconnects: dict[str, int] = {}
        self._unregistered: set[str] = set()  # closed for good: every flush deletes their record
        self._stream_stats = StreamStatsWriter(client)
        self._wake = asyncio.Event()  # set when a flush is due early: buffer full, or stopping
        self._interrupt = asyncio.Event()  # cuts a Redis backoff short: stopping, or memory at its bound
        self._stopping = False
        self._unavailable_since: float | None = None
        self._buffer_warned = False
        self._spill_warned = False
        # This run's id and the last number given to an event of each table and shard (collector.audit).
        self.run_id = run or f"r{time.time_ns() // 1000}-{os.getpid()}"
        self._shards = options.queue_shards
        self._run_tags = [
            b',"run":"' + shard_run(self.run_id, shard).encode() + b'","seq":'
            for shard in range(self._shards)
        ]
        self._seq: dict[Lane, int] = {}
        spill = None if options.spill_dir is None else Spill(options.spill_dir, self.run_id)
        self.pressure = Backpressure(spill, options.max_queue_bytes, options.stream_shard)

    # --- the hot path: called by the receive loops, never awaits ---------------------------------

    def push_event(
        self, table: str, market: str, received_at_us: int, frame: bytes, stream: str = ""
    ) -> None:
        """Queue one received event on its stream's shard, numbered within this run, table and shard."""
        lane = (table, shard_of_stream(stream, self._shards) if self._shards > 1 else 0)
        seq = self._seq.get(lane, 0) + 1
        self._seq[lane] = seq
        tag = self._run_tags[lane[1]] + str(seq).encode()
        self._push(lane, make_envelope(market, received_at_us, frame, audit=tag))

    def push(self, table: str, envelope: bytes) -> None:
        """Queue one envelope for `table` (on shard 0: it has no symbol to shard by)."""
        self._push((table, 0), envelope)

    def _push(self, lane: Lane, envelope: bytes) -> None:
        queue = self._queues.get(lane)
        if queue is None:
            queue = self._queues[lane] = []
        queue.append(envelope)
        self._buffered += 1
        if self._buffered >= self._options.flush_max_events:
            self._wake.set()
            if self._buffered >= self._options.buffer_max_events:
                self._interrupt.set()

    def push_deadletter(self, letter: DeadLetter) -> None:
        """Queue one dead letter."""
        self._deadletters.append(letter)
        self._buffered += 1

    # --- bookkeeping -----------------------------------------------------------------------------

    def register(self, state: ConnectionState) -> None:
        """Mirror `state` (and its per-stream stats) to Redis on every flush where it changed."""
        self._states[state.id] = state
        self._unregistered.discard(state.id)

    def unregister(self, state: ConnectionState) -> None:
        """Stop mirroring `state` (its connection was closed for good) and delete its record."""
        self._states.pop(state.id, None)
        self._unregistered.add(state.id)

    @property
    def buffered(self) -> int:
        """Envelopes and dead letters received but not yet committed to Redis."""
        return self._buffered

    def buffered_envelopes(self, table: str) -> list[bytes]:
        """A copy of the envelopes of `table` waiting to be flushed, oldest first within each shard."""
        return [raw for (name, _), queue in sorted(self._queues.items()) if name == table for raw in queue]

    def buffered_deadletters(self) -> list[DeadLetter]:
        """A copy of the dead letters waiting to be flushed, oldest first."""
        return list(self._deadletters)

    def buffered_by_table(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (table, _), queue in self._queues.items():
            if queue:
                counts[table] = counts.get(table, 0) + len(queue)
        if self._deadletters:
            counts["deadletter"] = len(self._deadletters)
        return counts

    # --- flushing --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush every STREAM_FLUSH_INTERVAL_MS, or at once when STREAM_FLUSH_MAX_EVENTS are waiting;
        between flushes, feed the spill back while the lists have room."""
        self.pressure.open()  # resume what an earlier run left on disk, before anything new goes there
        # What the lists already hold, before the first flush adds to them (skipped while Redis is down).
        self.pressure.watch(keys.queue(t, k) for t in keys.TABLES for k in range(self._shards))
        await self._refresh_and_feed()
        delays: Iterator[float] | None = None
        while not self._stopping:
            if self._buffered < self._options.flush_max_events and not self.pressure.feed_ready():
                await _wait(self._wake, self._options.flush_interval_s)
            self._wake.clear()
            if self._stopping:
                break
            self._check_buffer_size()
            if await self._attempt() and await self._refresh_and_feed():
                delays = None
                continue
            if self._buffered >= self._options.buffer_max_events:
                await self._spill_all("redis unavailable and STREAM_BUFFER_MAX_EVENTS reached")
            delays = delays or backoff_delays(REDIS_RETRY_INITIAL_S, REDIS_RETRY_MAX_S)
            await _wait(self._interrupt, next(delays))  # only stopping or a full buffer cut it short
            if not self._stopping:
                self._interrupt.clear()

    def stop(self) -> None:
        """Make `run()` return after its current flush; call `drain()` afterwards."""
        self._stopping = True
        self._interrupt.set()
        self._wake.set()

    def close(self) -> None:
        """Release the spill directory (after `drain()`); what is on disk waits for the next start."""
        self.pressure.close()

    async def drain(self, timeout_s: float) -> int:
        """Flush until nothing is left, retrying Redis for at most `timeout_s`, then spill what is
        still buffered; return what is left (dead letters, or all if the disk refused too)."""
        deadline = time.monotonic() + timeout_s
        delays = backoff_delays(REDIS_RETRY_INITIAL_S, REDIS_RETRY_MAX_S)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            batch = self._next_batch()
            if batch.is_empty():
                return 0
            if not await self._attempt(batch, remaining):
                await asyncio.sleep(min(next(delays), max(deadline - time.monotonic(), 0)))
        if self._buffered:
            await self._spill_all("redis unavailable at shutdown")
        if self._buffered:
            logger.error(
                "sink.unflushed events=%d by_table=%s reason=redis unavailable for %.0fs at shutdown",
                self._buffered,
                self.buffered_by_table(),
                timeout_s,
            )
        return self._buffered

    async def flush(self) -> int:
        """One flush now; returns the envelopes and dead letters it committed to Redis or disk.
        Raises on Redis errors."""
        batch = self._next_batch()
        if batch.is_empty():
            return 0
        await self._write(batch)
        self._commit(batch)
        return batch.events + await self._spill(batch)

    async def _attempt(self, batch: _Batch | None = None, timeout_s: float | None = None) -> bool:
        """Write one batch; on a Redis error log (once per outage) and return False, keeping it all."""
        batch = batch or self._next_batch()
        if batch.is_empty():
            return True
        try:
            await asyncio.wait_for(self._write(batch), timeout_s)
        except REDIS_ERRORS as error:
            # Kept in memory and retried whatever the error: nothing received is dropped. The house's
            # one classification tells the operator whether waiting will help.
            if self._unavailable_since is None:
                self._unavailable_since = time.monotonic()
                logger.error(
                    "sink.redis_unavailable error=%s buffered=%d%s",
                    _one_line(error),
                    self._buffered,
                    "" if is_transient(error) else " (permanent: it will not pass by itself; fix Redis)",
                )
            else:
                logger.debug("sink.redis_retry_failed error=%s buffered=%d", _one_line(error), self._buffered)
            return False
        self._commit(batch)
        await self._spill(batch)
        if self._unavailable_since is not None:
            logger.warning(
                "sink.redis_recovered after_s=%.1f buffered=%d",
                time.monotonic() - self._unavailable_since,
                self._buffered,
            )
            self._unavailable_since = None
            self._spill_warned = False
        return True

    async def _spill(self, batch: _Batch) -> int:
        """Write `batch`'s disk part (now the head of each table's buffer) to the spill; returns how
        many envelopes it took (none when the disk refused them: they stay buffered)."""
        if not batch.spilled:
            return 0
        groups = Groups(
            [
                (keys.queue(*lane), keys.shard_name(*lane), self._queues[lane][:n])
                for lane, n in batch.spilled.items()
            ]
        )
        if not await self.pressure.spill_groups(groups):
            return 0
        for lane, count in batch.spilled.items():
            del self._queues[lane][:count]
        self._buffered -= groups.envelopes
        return groups.envelopes

    async def _spill_all(self, reason: str) -> None:
        """Redis cannot take anything: move every buffered envelope to disk, so memory stays flat."""
        counts = {lane: len(queue) for lane, queue in self._queues.items() if queue}
        if not counts or self.pressure.spill is None:
            return
        spilled = await self._spill(_Batch({}, 0, [], [], {}, spilled=counts))
        log = logger.debug if self._spill_warned else logger.warning  # once per outage
        log("sink.spilled_buffer envelopes=%d reason=%s", spilled, reason)
        self._spill_warned = self._spill_warned or spilled > 0

    async def _refresh_and_feed(self) -> bool:
        """The lists' lengths (every QUEUE_REFRESH_S) and one pipeline of the spill fed back."""
        if self.pressure.spill is None:
            return True
        try:
            # What the last spill took counts as queued from here, also when no flush follows it.
            await self.pressure.refresh_if_due(self._client, self._queued_upto())
            await self.pressure.feed(self._client, self._queued_upto())
        except REDIS_ERRORS as error:
            logger.debug(
                "sink.feed_failed error=%s spilled=%d", _one_line(error), self.pressure.spill.envelopes
            )
            return False
        return True

    def _next_batch(self) -> _Batch:
        """The oldest envelopes of each table (up to a cap) and every changed statistic."""
        limit = MAX_EVENTS_PER_TABLE_PER_FLUSH
        counts = {lane: min(len(queue), limit) for lane, queue in self._queues.items() if queue}
        names = {lane: keys.queue(*lane) for lane in counts}
        routed = self.pressure.route({names[n]: (count, self._queues[n]) for n, count in counts.items()})
        envelopes = {n: routed[names[n]] for n in counts if routed[names[n]]}
        spilled = {n: count - routed[names[n]] for n, count in counts.items() if count > routed[names[n]]}
        streams: list[tuple[ConnectionState, str, int, int | None]] = []
        reconnects: list[tuple[str, int]] = []
        states: dict[str, bytes] = {}
        for state in self._states.values():
            for stream, stats in state.stream_stats.items():
                if stats.messages != self._written_streams.get((state.id, stream), 0):
                    streams.append((state, stream, stats.messages, stats.last_message_us))
            if state.reconnects != self._written_reconnects.get(state.id, 0):
                reconnects.append((state.id, state.reconnects))
            encoded = state.to_json()
            if encoded != self._written_states.get(state.id):
                states[state.id] = encoded
        return _Batch(envelopes, min(len(self._deadletters), limit), streams, reconnects, states, spilled)

    async def _write(self, batch: _Batch) -> None:
        pipe: Any = self._client.pipeline(transaction=True)
        pushed: list[tuple[str, int, int]] = []  # list, envelopes, index of the RPUSH's reply
        for lane, count in batch.envelopes.items():
            pushed.append((keys.queue(*lane), count, len(pipe)))
            pipe.rpush(keys.queue(*lane), *self._queues[lane][:count])
        if batch.envelopes:
            shards.wake(pipe)
        if self._seq:
            pipe.hset(keys.AUDIT_QUEUED, mapping=self._queued_upto(batch.envelopes))
        deadletter.push(pipe, self._deadletters[: batch.deadletters])
        updates: dict[tuple[str, str], tuple[int, int | None]] = {}
        for state, stream, messages, last in batch.streams:
            delta = messages - self._written_streams.get((state.id, stream), 0)
            key = (state.market, stream)
            updates[key] = (updates.get(key, (0, None))[0] + delta, last)
        await self._stream_stats.add(pipe, updates)  # one argument for every stream (queue.stream_stats)
        for connection_id, total in batch.reconnects:
            delta = total - self._written_reconnects.get(connection_id, 0)
            counters.incr(pipe, "reconnects", connection_id, amount=delta)
        if self._unregistered:  # also after a batch built before unregister() wrote the record again
            pipe.hdel(keys.CONNECTIONS, *self._unregistered)
        if batch.states:
            pipe.hset(keys.CONNECTIONS, mapping=batch.states)
        self.pressure.publish(pipe)  # with the numbers queued: what is on disk counts as queued too
        replies = await pipe.execute()
        for name, count, index in pushed:
            self.pressure.gauge.pushed(name, count, int(replies[index]))

    def _queued_upto(self, flushed: dict[Lane, int] | None = None) -> dict[str, int]:
        """`<run>/<table>` (the shard's run) -> the last number in Redis or on disk once `flushed`
        ((table, shard) -> envelopes pushed) is committed: every number not in the buffer any more
        (numbered tables only)."""
        flushed = flushed or {}
        return {
            keys.audit_field(self.run_id, keys.shard_name(table, shard)): seq
            - (len(self._queues.get((table, shard), ())) - flushed.get((table, shard), 0))
            for (table, shard), seq in self._seq.items()
        }

    def _commit(self, batch: _Batch) -> None:
        """Forget what `batch` wrote; anything pushed meanwhile sits behind it and stays."""
        for lane, count in batch.envelopes.items():
            del self._queues[lane][:count]
        del self._deadletters[: batch.deadletters]
        self._buffered -= batch.events
        for state, stream, messages, _last in batch.streams:
            self._written_streams[(state.id, stream)] = messages
        self._written_reconnects.update(batch.reconnects)
        self._written_states.update(batch.states)

    def _check_buffer_size(self) -> None:
        warn_at = self._options.buffer_warn_events
        if not self._buffer_warned and self._buffered > warn_at:
            self._buffer_warned = True
            logger.warning(
                "sink.buffer_high buffered=%d warn_events=%d by_table=%s",
                self._buffered,
                warn_at,
                self.buffered_by_table(),
            )
        elif self._buffer_warned and self._buffered <= warn_at // 2:
            self._buffer_warned = False
            logger.info("sink.buffer_normal buffered=%d", self._buffered)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `event` is set meanwhile."""
    if event.is_set():
        return
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass


def _one_line(error: BaseException) -> str:
    text = str(error).replace("\n", " ") or type(error).__name__
    return f"{type(error).__name__}: {text}"
