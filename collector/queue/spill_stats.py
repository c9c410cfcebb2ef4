"""The stream processes' spill figures in Redis (`keys.spill`, `keys.spill_pending`): web, status, audit.

Each stream process (one per shard, `collector streams --shard i/n`) rewrites its own two hashes whole,
named by its shard's label, inside the same MULTI that moves envelopes onto or off its disk
(collector.streams.pressure); it never touches another shard's. A reader finds every shard's hashes by
SCAN (a stopped or crashed shard's spill still counts: it waits for that shard's next start) and
combines them. One that takes `keys.AUDIT_QUEUED`, then the spill, then the queues sees every queued
envelope at least once: on disk, in a queue, or drained.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import redis

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


def publish(pipe: Any, shard: str, figures: SpillFigures, pending: dict[str, int]) -> None:
    """Queue the rewrite of shard `shard`'s two hashes on `pipe` (a MULTI pipeline, sync or async)."""
    pipe.hset(
        keys.spill(shard),
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
    pipe.delete(keys.spill_pending(shard))
    if pending:
        pipe.hset(keys.spill_pending(shard), mapping=pending)


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


def combine_figures(shards: Iterable[SpillFigures | None]) -> SpillFigures | None:
    """Every stream shard's figures as one; None when there are none. Pure.

    What each process holds on disk adds up (envelopes, bytes, segments; spilling if any is); the
    oldest segment and the least free disk are the ones to watch. Every process sees the same Redis
    lists, so their bytes, the cap and the drains' pace are not summed: the largest view is taken.
    """
    present = [f for f in shards if f is not None]
    if not present:
        return None
    oldest = [f.oldest_us for f in present if f.oldest_us is not None]
    free = [f.disk_free_bytes for f in present if f.disk_free_bytes is not None]
    return SpillFigures(
        envelopes=sum(f.envelopes for f in present),
        bytes=sum(f.bytes for f in present),
        segments=sum(f.segments for f in present),
        oldest_us=min(oldest) if oldest else None,
        spilling=any(f.spilling for f in present),
        queue_bytes=max(f.queue_bytes for f in present),
        cap_bytes=max(f.cap_bytes for f in present),
        drain_rate=max(f.drain_rate for f in present),
        disk_free_bytes=min(free) if free else None,
        updated_us=max(f.updated_us for f in present),
    )


def merge_pending(shards: Iterable[dict[str, int]]) -> dict[str, int]:
    """Every stream shard's `<run>/<table>` -> envelopes on disk, as one. Pure.

    A run's segments are in one process's directory, so fields do not repeat; if one does (a stale
    hash of a directory since taken over under another label) the larger count is kept, not the sum,
    so nothing counts twice.
    """
    merged: dict[str, int] = {}
    for pending in shards:
        for name, count in pending.items():
            merged[name] = max(count, merged.get(name, 0))
    return merged


def spill_keys(client: redis.Redis) -> tuple[list[str], list[str]]:
    """The names of every shard's figures hash and pending hash in Redis (SCAN: running or not)."""
    found = sorted({_text(k) for k in client.scan_iter(match=keys.SPILL_MATCH, count=1000)})
    figures = [name for name in found if name.startswith(keys.spill(""))]
    pending = [name for name in found if name.startswith(keys.spill_pending(""))]
    return figures, pending


def read_figures(client: redis.Redis) -> SpillFigures | None:
    """Every shard's spill figures as one (what /health shows reads them in its own pipeline)."""
    names, _ = spill_keys(client)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
    return combine_figures(parse_figures(raw) for raw in pipe.execute())


def read_pending(client: redis.Redis) -> dict[str, int]:
    """What waits on every shard's disk, `<run>/<table>` -> envelopes (what `collector audit` counts)."""
    _, names = spill_keys(client)
    pipe = client.pipeline(transaction=True)  # every shard's at one moment
    for name in names:
        pipe.hgetall(name)
    return merge_pending(parse_pending(raw) for raw in pipe.execute())


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
