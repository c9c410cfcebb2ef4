"""Reliable batches out of a Redis list: claim into an in-flight list, acknowledge after the COMMIT.

The in-flight pattern of kombu's Redis transport: a batch moves atomically from
`collector:queue:<table>` to `collector:inflight:<table>` and is deleted only once PostgreSQL has
committed it. A drain that dies (SIGKILL, OOM, lost node) leaves its batch in flight; the next drain
of that table (the per-table lock makes it the only one) claims that batch again before anything
new, and the natural keys make the second write insert nothing twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from collector.queue import counters, keys

# KEYS[1] = queue list, KEYS[2] = in-flight list; ARGV[1] = maximum number of elements.
# Returns the batch to write: the whole in-flight list when a previous drain left one behind,
# otherwise up to ARGV[1] elements moved from the head of the queue to the in-flight list.
CLAIM_SCRIPT = """
local pending = redis.call('LRANGE', KEYS[2], 0, -1)
if #pending > 0 then
  return pending
end
local items = redis.call('LPOP', KEYS[1], tonumber(ARGV[1]))
if not items then
  return {}
end
-- unpack() is bounded by Lua's C stack (~8000 values): push in slices.
for i = 1, #items, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(items, i, math.min(i + 999, #items)))
end
return items
"""


class BatchQueue:
    """Claim/acknowledge batches of one table's queue. Not thread-safe; one per drain run."""

    def __init__(self, client: redis.Redis, table: str) -> None:
        self._client = client
        self.table = table
        self._claim = client.register_script(CLAIM_SCRIPT)

    def claim(self, max_items: int) -> list[bytes]:
        """The next batch (possibly a re-delivered one); empty when the queue is empty."""
        result = self._claim(keys=[keys.queue(self.table), keys.inflight(self.table)], args=[max_items])
        return list(result)

    def acknowledge(
        self,
        committed_at_us: int,
        dead_letters: Sequence[bytes] = (),
        inserted: int = 0,
        duplicates: int = 0,
        coin_m_skipped: int = 0,
    ) -> None:
        """Drop the in-flight batch (its rows are committed) and record what happened, atomically."""
        pipe = self._client.pipeline(transaction=True)
        if dead_letters:
            pipe.rpush(keys.DEADLETTER, *dead_letters)
            counters.incr(pipe, "deadletters", "drain", amount=len(dead_letters))
        pipe.delete(keys.inflight(self.table))
        pipe.hset(keys.DRAIN_LAST_SUCCESS_US, self.table, committed_at_us)
        if inserted:
            counters.incr(pipe, "rows_inserted", self.table, amount=inserted)
        if duplicates:
            counters.incr(pipe, "rows_duplicate", self.table, amount=duplicates)
        if coin_m_skipped:
            counters.incr(pipe, "coin_m_skipped", self.table, amount=coin_m_skipped)
        pipe.execute()

    def lengths(self) -> tuple[int, int]:
        """(queued, in flight) element counts."""
        pipe = self._client.pipeline(transaction=False)
        pipe.llen(keys.queue(self.table))
        pipe.llen(keys.inflight(self.table))
        queued, in_flight = pipe.execute()
        return int(queued), int(in_flight)
