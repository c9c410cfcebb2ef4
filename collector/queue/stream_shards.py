"""The stream-process registry: one record per stream shard in `keys.STREAM_SHARDS` (field = `i/n`).

Each stream process (`collector streams --shard i/n`; `0/1` when unsharded) rewrites its record
every second while running (its heartbeat) and marks it `stopped` at a clean stop. Its next start
finds `running` there when it crashed; /health and `collector status` show every shard and name one
whose heartbeat stopped. Reading is lenient, like `collector.queue.connections`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

# A heartbeat older than this means the process is gone: it beats every second, so several missed
# beats, not one busy loop turn or one slow Redis round trip.
HEARTBEAT_STALE_S: Final = 5.0
RUNNING: Final = "running"
STOPPED: Final = "stopped"
# A dead shard of an earlier layout, kept until every shard of the new layout recorded its crash.
CRASHED: Final = "crashed"


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """What one stream process last said about itself."""

    label: str  # `i/n`
    run: str = ""
    host: str = ""
    pid: int = 0
    started_us: int = 0
    alive_us: int = 0  # its last heartbeat (or the time of its clean stop)
    state: str = RUNNING
    taken_by: tuple[str, ...] = ()  # CRASHED: the shards of the new layout that recorded the crash

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "run": self.run,
                "host": self.host,
                "pid": self.pid,
                "started_us": self.started_us,
                "alive_us": self.alive_us,
                "state": self.state,
                **({"taken_by": list(self.taken_by)} if self.taken_by else {}),
            }
        )

    @classmethod
    def from_json(cls, label: str, raw: bytes | str) -> ShardRecord:
        """The record stored under `label`; an unreadable one reads as a shard that says nothing."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            return cls(label, state="unknown")
        return cls(
            label,
            str(data.get("run") or ""),
            str(data.get("host") or ""),
            _int(data.get("pid")),
            _int(data.get("started_us")),
            _int(data.get("alive_us")),
            str(data.get("state") or "unknown"),
            tuple(str(x) for x in taken) if isinstance(taken := data.get("taken_by"), list) else (),
        )

    def stale(self, now_us: int) -> bool:
        """Whether its heartbeat stopped (a running shard that crashed, or was killed)."""
        return now_us - self.alive_us > HEARTBEAT_STALE_S * 1e6

    def describe(self) -> str:
        """`pid 123 on host-a, run r...`: which process this was, for a log line or a health reason."""
        return f"pid {self.pid} on {self.host or '?'}, run {self.run or '?'}"


def read_shards(fields: dict[Any, Any]) -> list[ShardRecord]:
    """The records of an HGETALL of `keys.STREAM_SHARDS`, sorted by count then index."""
    records = [ShardRecord.from_json(_text(k), v) for k, v in fields.items()]
    return sorted(records, key=lambda r: _order(r.label))


def _order(label: str) -> tuple[int, int, str]:
    index, _, count = label.partition("/")
    try:
        return int(count), int(index), label
    except ValueError:
        return 1 << 30, 0, label


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
