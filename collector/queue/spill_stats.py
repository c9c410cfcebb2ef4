"""The stream process's spill figures in Redis (`keys.SPILL`, `keys.SPILL_PENDING`): web, status, audit.

The stream process rewrites both whole, inside the same MULTI that moves envelopes onto or off its
disk (collector.streams.pressure), so a reader that takes `keys.AUDIT_QUEUED`, then the spill, then the
queues sees every queued envelope at least once: on disk, in a queue, or drained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

from collector.queue import keys

# KEYS[1] = collector:audit:queued; ARGV = field, number, field, number, ...
# Raises each field to its number, never lowers it: a segment of an earlier run found on disk at
# start counts as queued up to its last number, whatever that run managed to record before it died.
RAISE_QUEUED_SCRIPT: Final = """
for i = 1, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > current then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""


@dataclass(frozen=True)
class SpillFigures:
    """What one stream process holds on disk and what it sees of the queues, at `updated_us`."""

    envelopes: int  # on disk, not yet fed back to Redis
    bytes: int
    segments: int
    oldest_us: int | None  # when the oldest segment on disk was opened
    spilling: bool  # new envelopes of some list go to disk now (it has envelopes there)
    queue_bytes: int  # estimated bytes in the lists it writes (length x mean envelope size)
    cap_bytes: int  # REDIS_MAX_QUEUE_BYTES
    drain_rate: float  # envelopes/s leaving those lists lately (the drains' pace)
    disk_free_bytes: int | None
    updated_us: int


def publish(pipe: Any, figures: SpillFigures, pending: dict[str, int]) -> None:
    """Queue the rewrite of both keys on `pipe` (a MULTI pipeline, sync or async)."""
    pipe.hset(
        keys.SPILL,
        mapping={
            "envelopes": figures.envelopes,
            "bytes": figures.bytes,
            "segments": figures.segments,
            "oldest_us": figures.oldest_us or 0,
            "spilling": int(figures.spilling),
            "queue_bytes": figures.queue_bytes,
            "cap_bytes": figures.cap_bytes,
            "drain_rate": f"{figures.drain_rate:.1f}",
            "disk_free_bytes": -1 if figures.disk_free_bytes is None else figures.disk_free_bytes,
            "updated_us": figures.updated_us or time.time_ns() // 1000,
        },
    )
    pipe.delete(keys.SPILL_PENDING)
    if pending:
        pipe.hset(keys.SPILL_PENDING, mapping=pending)


def raise_queued(pipe: Any, numbers: dict[str, int]) -> None:
    """Queue raising `keys.AUDIT_QUEUED`'s fields to `numbers` (never lowering one)."""
    if numbers:
        args = [part for name, seq in sorted(numbers.items()) for part in (name, seq)]
        pipe.eval(RAISE_QUEUED_SCRIPT, 1, keys.AUDIT_QUEUED, *args)


def parse_figures(raw: dict[Any, Any]) -> SpillFigures | None:
    """The figures from the hash as Redis returns it; None when absent or malformed."""
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    try:
        free = int(fields["disk_free_bytes"])
        return SpillFigures(
            envelopes=int(fields["envelopes"]),
            bytes=int(fields["bytes"]),
            segments=int(fields["segments"]),
            oldest_us=int(fields["oldest_us"]) or None,
            spilling=fields["spilling"] == "1",
            queue_bytes=int(fields["queue_bytes"]),
            cap_bytes=int(fields["cap_bytes"]),
            drain_rate=float(fields["drain_rate"]),
            disk_free_bytes=None if free < 0 else free,
            updated_us=int(fields["updated_us"]),
        )
    except (KeyError, ValueError):
        return None


def parse_pending(raw: dict[Any, Any]) -> dict[str, int]:
    """`<run>/<table>` -> envelopes on disk, from the hash as Redis returns it (bad fields left out)."""
    result = {}
    for name, value in raw.items():
        try:
            result[_text(name)] = int(_text(value))
        except ValueError:
            continue
    return result


def drain_eta_s(backlog: int, drain_rate: float) -> float | None:
    """Seconds until `backlog` envelopes are drained at `drain_rate` per second; None when nothing
    drains (PostgreSQL down, no worker), 0 when there is no backlog. Pure."""
    if backlog <= 0:
        return 0.0
    if drain_rate <= 0:
        return None
    return backlog / drain_rate


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
