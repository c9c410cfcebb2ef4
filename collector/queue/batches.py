"""Reliable batches out of a Redis list: claim into an in-flight list, acknowledge after the COMMIT.

The in-flight pattern of kombu's Redis transport, one list per batch: a claim moves up to N
envelopes atomically from a shard's queue `collector:queue:<shard>` to a new
`collector:inflight:<shard>:<id>` and records that key in the set `collector:inflight:<shard>`
(`<shard>` is `<table>` or `<table>:s<k>`, `keys.shard_name`); each shard is its own FIFO. The
batch is deleted only once PostgreSQL has committed it. A drain that dies (SIGKILL, OOM, lost node)
leaves its batches in flight; the next drain of that shard recovers them before claiming anything
new, and the natural keys make the second write insert nothing twice. Acknowledging one batch never
touches another, so two batches can be in flight at once (one being parsed while the previous is
written).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    """Claim / recover / acknowledge batches of one shard of a table's queue."""

    def __init__(self, client: redis.Redis, table: str, shard: int = 0) -> None:
        self._client = client
        self.table = table
        self.shard = shard
        self._inflight = keys.inflight(table, shard)
        self._claim = client.register_script(CLAIM_SCRIPT)

    def claim(self, max_items: int) -> Batch | None:
        """Move the next batch into flight; None when the queue is empty."""
        table, shard = self.table, self.shard
        result = self._claim(
            keys=[keys.queue(table, shard), self._inflight, keys.inflight_counter(table, shard)],
            args=[max_items, keys.inflight_batch_prefix(table, shard)],
        )
        if not result:
            return None
        key, items = result
        return Batch(key.decode() if isinstance(key, bytes) else key, list(items))

    def recover(self) -> list[Batch]:
        """Batches left in flight by drains that did not finish, oldest first.

        Only call this while holding the shard's drain lock: then no other drain has batches in flight.
        """
        members: set[bytes] = self._client.smembers(self._inflight)  # type: ignore[assignment]
        batch_keys = sorted((k.decode() for k in members), key=_batch_number)
        batches = []
        for key in batch_keys:
            items: list[bytes] = self._client.lrange(key, 0, -1)  # type: ignore[assignment]
            if items:
                batches.append(Batch(key, items))
            else:
                self._client.srem(self._inflight, key)
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
        pipe.srem(self._inflight, batch.key)
        pipe.hset(keys.DRAIN_LAST_SUCCESS_US, self.table, committed_at_us)
        if inserted:
            counters.incr(pipe, "rows_inserted", self.table, amount=inserted)
        if duplicates:
            counters.incr(pipe, "rows_duplicate", self.table, amount=duplicates)
        if coin_m_skipped:
            counters.incr(pipe, "coin_m_skipped", self.table, amount=coin_m_skipped)
        pipe.execute()


def inflight_length(client: redis.Redis, table: str, shards: Iterable[int] = (0,)) -> int:
    """Envelopes currently in flight for `table`, over all its batches of the given shards."""
    batch_keys = [key for shard in shards for key in client.smembers(keys.inflight(table, shard))]
    if not batch_keys:
        return 0
    pipe = client.pipeline(transaction=False)
    for key in batch_keys:
        pipe.llen(key)
    return int(sum(pipe.execute()))


def queue_length(client: redis.Redis, table: str, shards: Iterable[int] = (0,)) -> int:
    """Envelopes waiting in the given shards of `table`'s queue."""
    return sum(int(client.llen(keys.queue(table, shard))) for shard in shards)
