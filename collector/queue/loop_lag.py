"""The stream process's event-loop lag in Redis (`keys.STREAMS_LOOP`), for the bench, /metrics and status.

One field per stream process (`i/n`, `0/1` when unsharded), JSON, rewritten whole each time, so it
always describes that shard's current run: a new run starts again from zero rather than inheriting
the last run's worst block.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import orjson
import redis
import redis.asyncio

from collector.queue import keys


@dataclass(frozen=True)
class LoopLag:
    """The longest event-loop block of a run, and how many passed the warning threshold."""

    max_block_ms: float
    blocks_over: int
    block_warn_ms: float
    started_us: int
    updated_us: int
    max_cpu_ms: float = 0.0  # the most CPU time its own thread used within one block: its own work


async def publish_loop_lag(client: redis.asyncio.Redis, lag: LoopLag, shard: str = "0/1") -> None:
    """Store `lag` as `shard`'s field (one HSET)."""
    await client.hset(keys.STREAMS_LOOP, shard, orjson.dumps(asdict(lag)))


def read_loop_lag(client: redis.Redis) -> LoopLag | None:
    """The worst published lag over the running (or last) stream processes; None when none was published."""
    return parse_loop_lag(client.hgetall(keys.STREAMS_LOOP))


def parse_loop_lags(raw: dict[Any, Any]) -> dict[str, LoopLag]:
    """Each shard's record from the hash's fields as Redis returns them; malformed ones are left out."""
    lags: dict[str, LoopLag] = {}
    for field, value in raw.items():
        try:
            data = orjson.loads(value)
            lags[_text(field)] = LoopLag(
                float(data["max_block_ms"]),
                int(data["blocks_over"]),
                float(data["block_warn_ms"]),
                int(data["started_us"]),
                int(data["updated_us"]),
                float(data.get("max_cpu_ms", 0.0)),
            )
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError):
            continue
    return lags


def parse_loop_lag(raw: dict[Any, Any]) -> LoopLag | None:
    """The worst of the shards' records, from the hash as Redis returns it."""
    return worst_loop_lag(parse_loop_lags(raw).values())


def worst_loop_lag(records: Iterable[LoopLag]) -> LoopLag | None:
    """The worst of the shards' records: the longest block and every block over the threshold. Pure."""
    lags = list(records)
    if not lags:
        return None
    worst = max(lags, key=lambda lag: lag.max_block_ms)
    return replace(
        worst,
        blocks_over=sum(lag.blocks_over for lag in lags),
        max_cpu_ms=max(lag.max_cpu_ms for lag in lags),
        started_us=min(lag.started_us for lag in lags),
        updated_us=max(lag.updated_us for lag in lags),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
