"""Queue shards: which shard an event goes to, waking the drains, and finding every shard that exists.

A table's queue is QUEUE_SHARDS lists (`keys.queue(table, shard)`); an event goes to the shard its
symbol hashes to, so each symbol's events stay in one list, in order, and shards drain in parallel
(one lock each). Shard 0 is the list of before sharding, and takes everything without a symbol (REST
bodies, the gap ledger). A shard list beyond the setting (QUEUE_SHARDS lowered while it held work)
is found by `present_lanes` and drained like the others, so no change of the setting strands envelopes.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, Final

import redis

from collector.queue import keys

# One (table, shard): the unit a drain locks, claims from and recovers.
Lane = tuple[str, int]

# Idle drain loops wait on the wake list; a token per stream flush is enough to wake one, and a few
# kept while every loop is busy let the next ones to go idle look again at once.
WAKE_TOKENS_MAX: Final = 8

_SHARD_KEY: Final = re.compile(rf"^{keys.PREFIX}:(?:queue|inflight):(\w+):s(\d+)$")


@lru_cache(maxsize=65_536)
def shard_of(symbol: str, shards: int) -> int:
    """The shard of `symbol`'s events (a stable hash: every process and run agrees). Pure."""
    if shards <= 1:
        return 0
    return zlib.crc32(symbol.encode()) % shards


def shard_of_stream(stream: str, shards: int) -> int:
    """The shard of a stream's events: by its symbol (`btcusdt@aggTrade`), or by the whole name for
    the all-market streams (`!forceOrder@arr`), which carry many symbols in one ordered stream. Pure."""
    return shard_of(stream.partition("@")[0], shards)


def push(pipe: Any, table: str, shard: int, envelopes: Sequence[bytes]) -> None:
    """Queue `envelopes` on one shard of `table` and wake an idle drain (on a pipeline, sync or async)."""
    pipe.rpush(keys.queue(table, shard), *envelopes)
    wake(pipe)


def wake(pipe: Any) -> None:
    """Wake one idle drain loop; the list is trimmed so tokens never pile up while every loop is busy."""
    pipe.rpush(keys.DRAIN_WAKE, b"1")
    pipe.ltrim(keys.DRAIN_WAKE, -WAKE_TOKENS_MAX, -1)


def wait_for_work(client: redis.Redis, timeout_s: float) -> bool:
    """Block on Redis until a wake token arrives or `timeout_s` passes; True when woken.

    Nothing is claimed while waiting, so a worker killed here loses nothing but a token.
    """
    return client.blpop([keys.DRAIN_WAKE], timeout=timeout_s) is not None


def configured_lanes(tables: Iterable[str], shards: int) -> list[Lane]:
    """Every (table, shard) of the setting. Pure."""
    return [(table, shard) for table in tables for shard in range(shards)]


def present_lanes(client: redis.Redis, tables: Sequence[str], shards: int) -> list[Lane]:
    """The lanes of the setting, plus every shard beyond it that still has a queue or batches in flight."""
    lanes = set(configured_lanes(tables, shards))
    for key in client.scan_iter(match=keys.SHARD_KEYS_PATTERN, count=1000):
        match = _SHARD_KEY.match(key.decode() if isinstance(key, bytes) else key)
        if match and match.group(1) in tables:
            lanes.add((match.group(1), int(match.group(2))))
    return sorted(lanes)


def lane_lengths(client: redis.Redis, lanes: Sequence[Lane]) -> list[tuple[int, int]]:
    """(envelopes queued, batches in flight) of each lane, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for table, shard in lanes:
        pipe.llen(keys.queue(table, shard))
        pipe.scard(keys.inflight(table, shard))
    replies = pipe.execute()
    return [(int(replies[i]), int(replies[i + 1])) for i in range(0, len(replies), 2)]
