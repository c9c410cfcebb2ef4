"""Drain loop slots: at most DRAIN_LOOPS drain loops run at once, over every worker on every host.

A drain loop holds a pool process for minutes; the same pool runs the alert task, so the number of
loops is capped: DRAIN_LOOPS over every worker, and on each worker node all but one of its pool
processes. The caps live in Redis (sorted sets of slot holders, scored by when each slot expires),
so they hold however many workers and hosts take the tasks. A loop
renews its slot before every batch and every wait; a loop whose process died frees its slot when the
score passes (DRAIN_LOCK_TTL_S), as the drain locks do.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Final

import redis

from collector.queue import keys

# KEYS[1] = slot set of every worker, KEYS[2] = slot set of this worker node;
# ARGV[1] = member, ARGV[2] = most slots in all, ARGV[3] = most on this node, ARGV[4] = time to live (ms).
# Returns 1 when the member now holds a slot (taken or renewed), 0 when no slot is free.
ACQUIRE_SCRIPT: Final = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
  end
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[4]), ARGV[1])
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
return 1
"""

# KEYS[1] = slot set of every worker, KEYS[2] = slot set of this node; ARGV[1] = member,
# ARGV[2] = time to live (ms). Returns 1 when the slot is still this member's and now expires in
# ARGV[2] ms, 0 when it expired.
RENEW_SCRIPT: Final = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
"""


def node_most(pool_processes: int | None, most: int) -> int:
    """How many loops one worker node may run: all but one of its pool processes, so the alert task
    (and anything else it serves) always finds one; a one-process pool still drains. Pure."""
    if not pool_processes:
        return most  # not known (a pool without processes of its own): the overall cap alone
    return max(1, min(most, pool_processes - 1))


class LoopSlot:
    """One drain loop's claim on a slot; never blocks (all taken means "enough loops run already")."""

    def __init__(
        self, client: redis.Redis, most: int, ttl_ms: int, node: str = "", node_most: int = 0
    ) -> None:
        self._client = client
        self._most = most
        self._node_most = node_most or most
        self._ttl_ms = ttl_ms
        self._keys = [keys.DRAIN_LOOPS, keys.drain_loops_of(node or socket.gethostname())]
        self.member = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex}"
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._renew = client.register_script(RENEW_SCRIPT)

    def acquire(self) -> bool:
        """Take a slot if fewer than DRAIN_LOOPS are held, and fewer than this node may hold."""
        args: list[str | int] = [self.member, self._most, self._node_most, self._ttl_ms]
        return bool(self._acquire(keys=self._keys, args=args))

    def renew(self) -> bool:
        """Push the slot's expiry out; False when it expired (the loop should stop: another may start)."""
        return bool(self._renew(keys=self._keys, args=[self.member, self._ttl_ms]))

    def release(self) -> None:
        pipe = self._client.pipeline(transaction=True)
        for key in self._keys:
            pipe.zrem(key, self.member)
        pipe.execute()


def running_loops(client: redis.Redis, now_ms: int) -> list[str]:
    """Members of the slots not yet expired: the drain loops running now."""
    members = client.zrangebyscore(keys.DRAIN_LOOPS, now_ms, "+inf")
    return [m.decode() if isinstance(m, bytes) else str(m) for m in members]
