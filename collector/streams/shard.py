"""Which streams one stream process owns when several share the work (`collector streams --shard i/n`). Pure.

- A symbol belongs to exactly one shard: CRC-32 of its upper-case name, modulo the shard count. CRC-32
  is the same on every host and Python version (Python's own `hash()` of a string is salted per
  process), so n processes started anywhere split the symbols the same way, and all of one symbol's
  streams (depth, aggTrade, markPrice) are in one process: its depth chain, resync and gap ledger too.
- The market-wide streams (`!markPrice@arr@1s`, `!forceOrder@arr`) name no symbol: shard 0 owns them.
- Shard 0/1, the default, owns everything and keeps the names an unsharded process always had:
  connection ids `spot-0`, run ids `r<µs>-<pid>`. Other shards prefix their connection ids
  (`s1of2-spot-0`), so records of two processes never share a field in Redis, and suffix their run
  ids (`r<µs>-<pid>-s1of2`), so `collector audit` names the shard of each run.
- Each shard spills to its own directory (`spill_dir`): `<SPILL_DIR>/shard-1of2`, so shards on one host
  never contend for one; the whole process keeps SPILL_DIR itself, so an existing spill resumes.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SHARD_PATTERN: Final = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
# Connection ids of a shard other than 0/1 begin with this (`s1of2-spot-0`).
ID_PREFIX: Final = re.compile(r"^s(\d+)of(\d+)-")
SPILL_SUBDIR: Final = re.compile(r"^shard-(\d+)of(\d+)$")  # a shard's directory under SPILL_DIR


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based); `Shard()` is the whole, unsharded process."""

    index: int = 0
    count: int = 1

    @property
    def label(self) -> str:
        """`1/2`: how the operator names it, and its field in the shard registry."""
        return f"{self.index}/{self.count}"

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def id_prefix(self) -> str:
        """What this shard's connection ids begin with (nothing for the whole process)."""
        return "" if self.whole else f"s{self.index}of{self.count}-"

    @property
    def run_suffix(self) -> str:
        return "" if self.whole else f"-s{self.index}of{self.count}"

    def owns_symbol(self, symbol: str) -> bool:
        return self.whole or zlib.crc32(symbol.upper().encode()) % self.count == self.index

    def owns_stream(self, name: str) -> bool:
        """Whether this shard carries the wire stream `name` (`btcusdt@depth@100ms`, `!forceOrder@arr`)."""
        # A market-wide stream (`!...`) names no symbol; the others lead with theirs. This is
        # `collector.binance.streams.stream_symbol`, which the settings cannot import (they validate
        # STREAM_SHARD with `parse_shard`, and that module imports the settings).
        if name.startswith("!") or "@" not in name:
            return self.index == 0
        return self.owns_symbol(name.split("@", 1)[0])

    def owns_connection(self, connection_id: str) -> bool:
        """Whether a connection record in Redis was written by this shard (by its id's prefix)."""
        match = ID_PREFIX.match(connection_id)
        if match is None:
            return self.whole
        return (int(match[1]), int(match[2])) == (self.index, self.count)


def spill_dir(base: Path, shard: Shard) -> Path:
    """The spill directory of `shard` under SPILL_DIR `base`: `base` itself for the whole process,
    `base/shard-<i>of<n>` for a shard (a directory is locked by one process while in use)."""
    return base if shard.whole else base / f"shard-{shard.index}of{shard.count}"


def other_split(directory: str, shard: Shard) -> bool:
    """Whether a spill directory named `directory` under SPILL_DIR (`""` for SPILL_DIR itself,
    `shard-1of3`) belongs to a split into another number of shards than `shard`'s: no process of the
    current split takes it, so what is on disk there waits until that split runs again."""
    if directory == "":
        return not shard.whole
    match = SPILL_SUBDIR.match(directory)
    return match is not None and int(match[2]) != shard.count


def parse_shard(text: str) -> Shard:
    """`"1/2"` -> Shard(1, 2); ValueError with one line saying what is wrong otherwise."""
    match = SHARD_PATTERN.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a shard: give i/n, e.g. 0/2 and 1/2 for two processes")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise ValueError(f"{text!r}: the shard count must be at least 1")
    if index >= count:
        raise ValueError(f"{text!r}: the shard index counts from 0 and must be below {count}")
    return Shard(index, count)


def shard_of_label(label: str) -> Shard | None:
    """The shard a registry field names, None when it is not `i/n`."""
    try:
        return parse_shard(label)
    except ValueError:
        return None
