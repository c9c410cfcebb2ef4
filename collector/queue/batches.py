"""Reliable batches out of a Redis list: claim into an in-flight list, acknowledge after the COMMIT.

The in-flight pattern of kombu's Redis transport, one list per batch: a claim moves up to N
envelopes atomically from `collector:queue:<table>` to a new `collector:inflight:<table>:<id>` and
records that key in the set `collector:inflight:<table>`. The batch is deleted only once PostgreSQL
has committed it. A drain that dies (SIGKILL, OOM, lost node) leaves its batches in flight; the
next drain of that table recovers them before claiming anything new, and the natural keys make the
second write insert nothing twice. Acknowledging one batch never touches another, so two batches can
be in flight at once (one being parsed while the previous is written).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from collector.queue import counters, deadletter, keys
from collector.queue.deadletter import DeadLetter

# KEYS[1] = queue list, KEYS[2] = in-flight registry set, KEYS[3] = batch id counter
# ARGV[1] = maximum number of elements, ARGV[2] = prefix of the batch's own list key
# Returns {batch_key, {elements...}}, or {} when the queue is empty.
CLAIM_SCRIPT = """
local items = redis.call('LPOP', KEYS[1], tonumber(ARGV[1]))
if not items then
  return {}
end
local batch_key = ARGV[2] .. redis.call('INCR', KEYS[3])
-- unpack() is bounded by Lua's C stack (~8000 values): push in slices.
for i = 1, #items, 1000 do
  redis.call('RPUSH', batch_key, unpack(items, i, math.min(i + 999, #items)))
end
redis.call('SADD', KEYS[2], batch_key)
return {batch_key, items}
"""


@dataclass(frozen=True)
class Batch:
    """Envelopes claimed together; `key` is their in-flight list, deleted on acknowledgement."""

    key: str
    items: list[bytes]


def _batch_number(key: str) -> int:
    return int(key.rsplit(":", 1)[1])


class BatchQueue:
    """Claim / recover / acknowledge batches of one table's queue."""

    def __init__(self, client: redis.Redis, table: str) -> None:
        self._client = client
        self.table = table
        self._claim = client.register_script(CLAIM_SCRIPT)

    def claim(self, max_items: int) -> Batch | None:
        """Move the next batch into flight; None when the queue is empty."""
        result = self._claim(
            keys=[keys.queue(self.table), keys.inflight(self.table), keys.inflight_counter(self.table)],
            args=[max_items, keys.inflight_batch_prefix(self.table)],
        )
        if not result:
            return None
        key, items = result
        return Batch(key.decode() if isinstance(key, bytes) else key, list(items))

    def recover(self) -> list[Batch]:
        """Batches left in flight by drains that did not finish, oldest first.

        Only call this while holding the table's drain lock: then no other drain has batches in flight.
        """
        members: set[bytes] = self._client.smembers(keys.inflight(self.table))  # type: ignore[assignment]
        batch_keys = sorted((k.decode() for k in members), key=_batch_number)
        batches = []
        for key in batch_keys:
            items: list[bytes] = self._client.lrange(key, 0, -1)  # type: ignore[assignment]
            if items:
                batches.append(Batch(key, items))
            else:
                self._client.srem(keys.inflight(self.table), key)
        return batches

    def acknowledge(
        self,
        batch: Batch,
        committed_at_us: int,
        dead_letters: Sequence[DeadLetter] = (),
        inserted: int = 0,
        duplicates: int = 0,
        coin_m_skipped: int = 0,
    ) -> None:
        """Drop a batch whose rows are committed and record what happened, atomically."""
        pipe = self._client.pipeline(transaction=True)
        deadletter.push(pipe, dead_letters)
        pipe.delete(batch.key)
        pipe.srem(keys.inflight(self.table), batch.key)
        pipe.hset(keys.DRAIN_LAST_SUCCESS_US, self.table, committed_at_us)
        if inserted:
            counters.incr(pipe, "rows_inserted", self.table, amount=inserted)
        if duplicates:
            counters.incr(pipe, "rows_duplicate", self.table, amount=duplicates)
        if coin_m_skipped:
            counters.incr(pipe, "coin_m_skipped", self.table, amount=coin_m_skipped)
        pipe.execute()


def inflight_length(client: redis.Redis, table: str) -> int:
    """Envelopes currently in flight for `table`, over all its batches."""
    batch_keys = client.smembers(keys.inflight(table))
    if not batch_keys:
        return 0
    pipe = client.pipeline(transaction=False)
    for key in batch_keys:
        pipe.llen(key)
    return int(sum(pipe.execute()))


def queue_length(client: redis.Redis, table: str) -> int:
    return int(client.llen(keys.queue(table)))
