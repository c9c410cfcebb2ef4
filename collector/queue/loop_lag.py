"""The stream process's event-loop lag in Redis (`keys.STREAMS_LOOP`), for the bench, /metrics and status.

The hash is rewritten whole each time, so it always describes the current run: a new run starts it
again from zero rather than inheriting the last run's worst block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

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


async def publish_loop_lag(client: redis.asyncio.Redis, lag: LoopLag) -> None:
    """Store `lag` (one HSET of every field)."""
    await client.hset(
        keys.STREAMS_LOOP,
        mapping={
            "max_block_ms": f"{lag.max_block_ms:.3f}",
            "blocks_over": lag.blocks_over,
            "block_warn_ms": f"{lag.block_warn_ms:g}",
            "started_us": lag.started_us,
            "updated_us": lag.updated_us or time.time_ns() // 1000,
            "max_cpu_ms": f"{lag.max_cpu_ms:.3f}",
        },
    )


def read_loop_lag(client: redis.Redis) -> LoopLag | None:
    """The published lag of the running (or last) stream process; None when none was published."""
    return parse_loop_lag(client.hgetall(keys.STREAMS_LOOP))


def parse_loop_lag(raw: dict[Any, Any]) -> LoopLag | None:
    """The record from the hash's fields as Redis returns them; None when empty or malformed."""
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    try:
        return LoopLag(
            float(fields["max_block_ms"]),
            int(fields["blocks_over"]),
            float(fields["block_warn_ms"]),
            int(fields["started_us"]),
            int(fields["updated_us"]),
            float(fields.get("max_cpu_ms", 0.0)),
        )
    except (KeyError, ValueError):
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
