"""Per-stream statistics in Redis: every stream's count and last receive time of one flush, in one call.

Each flush of the stream process adds to the count of every stream that received events (in
`keys.STREAM_MESSAGES` and in the `messages` counter of /metrics) and sets its last receive time
(`keys.STREAM_LAST_US`). As separate commands, 2,000 streams are 4,000 HINCRBYs per flush, whose
packing and parsing held the stream process's event loop for a quarter of a second; even as one
call with three arguments a stream, packing 6,000 arguments took tens of milliseconds
(bench/streams_many.py). The whole update therefore travels as one JSON argument of one EVALSHA,
built by orjson in well under a millisecond, and Redis applies it in about one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson
import redis.asyncio

from collector.queue import keys
from collector.queue.counters import label_field

# KEYS[1] = keys.STREAM_MESSAGES; KEYS[2] = keys.metric("messages"); KEYS[3] = keys.STREAM_LAST_US.
# ARGV[1] = JSON list of [field in KEYS[1] and KEYS[3], field in KEYS[2], amount, last receive µs or ""],
# every number as a string (Lua numbers are doubles).
UPDATE_SCRIPT: Final = """
local rows = cjson.decode(ARGV[1])
for _, row in ipairs(rows) do
  if row[3] ~= '0' then
    redis.call('HINCRBY', KEYS[1], row[1], row[3])
    redis.call('HINCRBY', KEYS[2], row[2], row[3])
  end
  if row[4] ~= '' then
    redis.call('HSET', KEYS[3], row[1], row[4])
  end
end
return #rows
"""


class StreamStatsWriter:
    """Queues one flush's per-stream updates on a pipeline; the script is registered once per client."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._update = client.register_script(UPDATE_SCRIPT)

    async def add(self, pipe: Any, updates: Mapping[tuple[str, str], tuple[int, int | None]]) -> None:
        """Queue on `pipe` (a pipeline of the same client): `(market, stream) -> (amount, last µs)`."""
        if not updates:
            return
        rows = [
            (keys.stream_field(market, stream), label_field(market, stream), str(amount), str(last or ""))
            for (market, stream), (amount, last) in updates.items()
        ]
        await self._update(
            keys=[keys.STREAM_MESSAGES, keys.metric("messages"), keys.STREAM_LAST_US],
            args=[orjson.dumps(rows)],
            client=pipe,
        )
