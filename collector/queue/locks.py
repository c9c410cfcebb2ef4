"""Locks in Redis: one holder per key, released or extended only by that holder, freed by expiry.

The lock of redis-py (`redis/lock.py`) and of Sentry's buffer flush: `SET key token NX PX ttl` takes
it, and Lua scripts compare the token before they delete or extend, so a holder whose lock expired
(and was then taken by someone else) can never release or extend the new holder's lock. A holder
that dies frees the key when the TTL runs out.

The locks of the collector:
- `drain_lock(table, shard)`: one drain per shard of a table's queue (`keys.drain_lock`), TTL
  `DRAIN_LOCK_TTL_S`, extended before each batch it writes; a drain loop holds it only while it
  works that shard, so other loops take the shard between its batches.
- `alerts_lock()`: one alert evaluation at a time (`keys.ALERTS_LOCK`), TTL past the task's hard
  time limit so it is never lost while the task still runs.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Final

import redis

from collector.queue import keys

# KEYS[1] = lock key; ARGV[1] = token of the holder.
# Returns 1 when the lock was ours and is deleted, 0 when it had expired (and may be someone else's).
RELEASE_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] = lock key; ARGV[1] = token of the holder; ARGV[2] = new time to live (ms).
# Returns 1 when the lock is still ours and now expires in ARGV[2] ms, 0 when it is not ours any more.
EXTEND_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""


class RedisLock:
    """One attempt to hold `key` for `ttl_ms`; never blocks (a busy lock means "someone else is on it")."""

    def __init__(self, client: redis.Redis, key: str, ttl_ms: int) -> None:
        self._client = client
        self.key = key
        self.ttl_ms = ttl_ms
        # Who holds it, for an operator reading the key (and a test telling holders apart).
        self.token = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex}"
        self._release = client.register_script(RELEASE_SCRIPT)
        self._extend = client.register_script(EXTEND_SCRIPT)

    def acquire(self) -> bool:
        """Take the lock if it is free; False when another holder has it."""
        return bool(self._client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def extend(self) -> bool:
        """Make the lock expire `ttl_ms` from now; False when it is no longer ours (it expired)."""
        return bool(self._extend(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> bool:
        """Give the lock up; False when it was no longer ours (it expired): then nothing is deleted."""
        return bool(self._release(keys=[self.key], args=[self.token]))


def drain_lock(client: redis.Redis, table: str, ttl_s: float, shard: int = 0) -> RedisLock:
    """The lock that keeps two drains of one shard of `table` from overlapping."""
    return RedisLock(client, keys.drain_lock(table, shard), int(ttl_s * 1000))


def alerts_lock(client: redis.Redis, ttl_ms: int) -> RedisLock:
    """The lock that keeps two alert evaluations from overlapping."""
    return RedisLock(client, keys.ALERTS_LOCK, ttl_ms)
