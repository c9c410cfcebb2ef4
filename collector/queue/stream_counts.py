"""Per-stream event counts in Redis: every stream's increment of one flush in a single script call.

Each flush of the stream process adds to the count of every stream that received events, in
`keys.STREAM_MESSAGES` and in the `messages` counter of /metrics. As separate HINCRBYs, 2,000
streams are 4,000 commands and replies per flush, whose packing and parsing held the stream process's
event loop for a quarter of a second at a time (bench/streams_many.py); one EVALSHA carries them all,
and Redis runs the loop in well under a millisecond.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import redis.asyncio

from collector.queue import keys
from collector.queue.counters import label_field

# KEYS[1] = keys.STREAM_MESSAGES; KEYS[2] = keys.metric("messages").
# ARGV = (field in KEYS[1], field in KEYS[2], amount), repeated: one triple per stream.
ADD_COUNTS_SCRIPT: Final = """
for i = 1, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 2])
  redis.call('HINCRBY', KEYS[2], ARGV[i + 1], ARGV[i + 2])
end
return #ARGV / 3
"""


class StreamCounts:
    """Adds per-stream increments in one call; the script is registered once per client."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._add = client.register_script(ADD_COUNTS_SCRIPT)

    async def add(self, pipe: Any, amounts: Mapping[tuple[str, str], int]) -> None:
        """Queue on `pipe` (a pipeline of the same client) the increments `(market, stream) -> amount`."""
        args: list[str | int] = []
        for (market, stream), amount in amounts.items():
            args += (keys.stream_field(market, stream), label_field(market, stream), amount)
        if args:
            await self._add(keys=[keys.STREAM_MESSAGES, keys.metric("messages")], args=args, client=pipe)
