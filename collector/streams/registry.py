"""A stream process takes its shard at start: crash detection, one process per shard, stale layouts retired.

`claim()` runs once, before anything is subscribed:
- The shard's own record (`collector.queue.stream_shards`) says `running`: its previous run crashed (it never
  marked itself stopped), and the gap ledger records outages from its last heartbeat. While that
  heartbeat still moves, another process holds the shard: `ShardTaken` (one line, exit 2), since
  two processes of one shard would store every event twice and fight over its ledger.
- Records of another layout (say `0/1` when this is `1/2`: the operator re-sharded) whose heartbeat
  stopped are retired with their loop-lag and connection records; one that crashed counts as a
  crash for every shard of the new layout, since each now carries some of its streams
  (`_take_crash`). The heartbeat key of the collector before shards (`keys.STREAMS_ALIVE`) becomes
  shard 0/1's record first, and counts the same way.
- This shard's connection records of earlier runs are deleted: the sink writes the current ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any, Final

import redis.asyncio
from redis.exceptions import WatchError

from collector.errors import ConfigError
from collector.queue import keys
from collector.queue.stream_shards import CRASHED, RUNNING, STOPPED, ShardRecord, read_shards
from collector.streams.shard import Shard, shard_of_label

logger = logging.getLogger(__name__)

POLL_S: Final = 0.5  # how often a start looks whether the recorded heartbeat still moves
HEARTBEAT_S: Final = 1.0  # the gap ledger's mirror beats this often too, once it runs


class ShardTaken(ConfigError):
    """Another live process records this shard."""


@dataclass
class Heartbeat:
    """This process's record in the registry, rewritten by the ledger's mirror every HEARTBEAT_S."""

    shard: Shard
    run: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_us: int = field(default_factory=lambda: time.time_ns() // 1000)

    def record(self, state: str = RUNNING) -> bytes:
        now = time.time_ns() // 1000
        return ShardRecord(
            self.shard.label, self.run, self.host, self.pid, self.started_us, now, state
        ).to_json()

    def beat(self, pipe: Any, state: str = RUNNING) -> None:
        """Add the heartbeat (or, with STOPPED, the clean stop) to `pipe`."""
        pipe.hset(keys.STREAM_SHARDS, self.shard.label, self.record(state))


async def claim(client: redis.asyncio.Redis, heartbeat: Heartbeat) -> int | None:
    """Take the shard (see the module docstring); returns the last heartbeat (µs) of a crashed run
    whose streams this shard now carries, None when every earlier run stopped cleanly."""
    shard = heartbeat.shard
    legacy = await client.getdel(keys.STREAMS_ALIVE)
    if legacy is not None:  # the collector before shards crashed: its record, as shard 0/1's
        await client.hsetnx(keys.STREAM_SHARDS, "0/1", ShardRecord("0/1", alive_us=int(legacy)).to_json())
    own = await _own_record(client, shard)
    crashed: list[int] = []
    if own is not None and own.state == RUNNING:
        crashed.append(await _wait_for_silence(client, own))
    now = time.time_ns() // 1000
    retired: list[Shard] = []
    for record in read_shards(await client.hgetall(keys.STREAM_SHARDS)):
        other = shard_of_label(record.label)
        if other is None or other.count == shard.count:
            continue
        if record.state == RUNNING and not record.stale(now):
            logger.warning(
                "streams.other_layout_running shard=%s other=%s other_process=%s hint=stop the processes "
                "of the old layout: while both run, a symbol may be recorded twice",
                shard.label,
                record.label,
                record.describe(),
            )
            continue
        retired.append(other)
        if record.state == STOPPED:
            await client.hdel(keys.STREAM_SHARDS, record.label)
        else:
            alive_us = await _take_crash(client, record.label, shard)
            if alive_us is not None:
                crashed.append(alive_us)
    connections = [_text(f) for f in await client.hkeys(keys.CONNECTIONS)]
    gone = [c for c in connections if any(owner.owns_connection(c) for owner in (shard, *retired))]
    pipe: Any = client.pipeline(transaction=True)
    for other in retired:
        pipe.hdel(keys.STREAMS_LOOP, other.label)
    if gone:
        pipe.hdel(keys.CONNECTIONS, *gone)
    heartbeat.beat(pipe)
    await pipe.execute()
    for other in retired:
        logger.info("streams.shard_retired shard=%s by=%s", other.label, shard.label)
    logger.info(
        "streams.shard_claimed shard=%s run=%s crashed_before=%s", shard.label, heartbeat.run, bool(crashed)
    )
    return min(crashed) if crashed else None


async def _take_crash(client: redis.asyncio.Redis, label: str, shard: Shard) -> int | None:
    """This shard's share of a crashed shard of another layout: its last heartbeat, once per shard.

    Every shard of the new layout carries some of the dead one's streams, so each must record the
    crash: the record stays (state `crashed`, `taken_by` the shards that took it) until the last of
    them has, then goes. WATCH keeps two shards starting together from losing each other's mark.
    """
    pipeline: Any = client.pipeline(transaction=True)
    async with pipeline as pipe:
        while True:
            try:
                await pipe.watch(keys.STREAM_SHARDS)
                raw = await pipe.hget(keys.STREAM_SHARDS, label)
                record = None if raw is None else ShardRecord.from_json(label, raw)
                if record is None or shard.label in record.taken_by:
                    return None
                taken = (*record.taken_by, shard.label)
                pipe.multi()
                if {f"{i}/{shard.count}" for i in range(shard.count)} <= set(taken):
                    pipe.hdel(keys.STREAM_SHARDS, label)
                else:
                    pipe.hset(
                        keys.STREAM_SHARDS, label, replace(record, state=CRASHED, taken_by=taken).to_json()
                    )
                await pipe.execute()
                return record.alive_us
            except WatchError:
                continue  # a heartbeat or another shard changed the hash meanwhile: read it again


async def beat(client: redis.asyncio.Redis, heartbeat: Heartbeat) -> None:
    """Beat every HEARTBEAT_S until cancelled: from the claim until the gap ledger's mirror takes over
    (resolving the symbols may take a while; the shard must not look dead, nor free, meanwhile)."""
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        try:
            pipe: Any = client.pipeline(transaction=False)
            heartbeat.beat(pipe)
            await pipe.execute()
        except (redis.RedisError, OSError, TimeoutError) as error:
            logger.debug("streams.heartbeat_failed error=%s", error)


async def release(client: redis.asyncio.Redis, heartbeat: Heartbeat, crashed_alive_us: int | None) -> None:
    """A start that failed before subscribing anything gives the shard back as it found it: stopped,
    or, when it had found a crash, still crashed at that time (the next start records that outage)."""
    if crashed_alive_us is None:
        value = heartbeat.record(STOPPED)
    else:
        shard = heartbeat.shard
        value = ShardRecord(
            shard.label, heartbeat.run, heartbeat.host, heartbeat.pid, alive_us=crashed_alive_us
        ).to_json()
    await client.hset(keys.STREAM_SHARDS, heartbeat.shard.label, value)


async def _own_record(client: redis.asyncio.Redis, shard: Shard) -> ShardRecord | None:
    raw = await client.hget(keys.STREAM_SHARDS, shard.label)
    return None if raw is None else ShardRecord.from_json(shard.label, raw)


async def _wait_for_silence(client: redis.asyncio.Redis, record: ShardRecord) -> int:
    """Until the recorded heartbeat is stale (-> its time); `ShardTaken` if it moves meanwhile."""
    first = record.alive_us
    while not record.stale(time.time_ns() // 1000):
        await asyncio.sleep(POLL_S)
        now = await _own_record(client, shard_of_label(record.label) or Shard())
        if now is None:
            break  # retired meanwhile by a process of another layout: nobody holds it
        if now.alive_us != first:
            raise ShardTaken(
                f"stream shard {record.label} is already recorded by {now.describe()} "
                f"(its heartbeat is live): give this process another --shard / STREAM_SHARD, or stop that one"
            )
    return first


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
