"""The dead-letter list: one record format for everything that could not be stored, whoever found it.

The stream process (a frame it cannot route), the drain (an envelope it cannot parse, or a value
PostgreSQL rejects) and the REST pollers (a body that is not a JSON object) all write a
`DeadLetter` with `push()` and read it back with `read()` / `DeadLetter.from_json()`.

Guarantees:
- The bytes are kept exactly: `frame` is stored as text when it is valid UTF-8, else as base64 under
  `frame_b64`; `DeadLetter.from_json(letter.to_json()).frame == letter.frame` for any bytes.
- Every record has the same keys, in the same order, whoever wrote it (null when not known), and
  exactly one of `frame` / `frame_b64`, last so that `LRANGE` shows the reason first.
- `push()` only queues commands: inside a MULTI pipeline the letters and the `deadletters{source}`
  counter are written together or not at all.

`frame` is what Binance sent: the WebSocket frame, the REST body, or (for the drain) the frame
inside the envelope. When the drain cannot even read an envelope's head, `frame` is the whole
envelope and `market` and `received_at_us` are null.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import orjson

from collector.queue import counters, keys

Source = Literal["streams", "drain", "rest"]
SOURCES: Final[tuple[Source, ...]] = ("streams", "drain", "rest")


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One thing that could not be stored, with why, who found it, and its exact bytes."""

    reason: str
    source: Source
    market: str | None  # "spot" / "futures"; None only for an envelope whose head is unreadable
    table: str | None  # the table it was meant for; None for a frame whose stream feeds no table
    received_at_us: int | None  # when the frame or body arrived (µs)
    frame: bytes  # exactly as received
    symbol: str | None = None  # the symbol asked for (REST)
    connection: str | None = None  # the WebSocket connection it came on (streams)
    run: str | None = None  # the stream process run and event number, when it had one (collector.audit)
    seq: int | None = None
    dead_at_us: int = field(default_factory=_now_us)  # when it was dead-lettered (µs)

    def to_json(self) -> bytes:
        """The list element: every key always present, the frame last."""
        record: dict[str, object] = {
            "reason": self.reason,
            "source": self.source,
            "market": self.market,
            "table": self.table,
            "symbol": self.symbol,
            "connection": self.connection,
            "run": self.run,
            "seq": self.seq,
            "received_at_us": self.received_at_us,
            "dead_at_us": self.dead_at_us,
        }
        try:
            record["frame"] = self.frame.decode("utf-8")
        except UnicodeDecodeError:
            record["frame_b64"] = base64.b64encode(self.frame).decode("ascii")
        return orjson.dumps(record)

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeadLetter:
        """Read one list element back, `frame` byte for byte; `ValueError` if it is not a dead letter.

        Records written before this format (issue 8) are read too: their `envelope` / `envelope_b64`
        becomes `frame`, and what they did not record is None.
        """
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            raise ValueError(f"dead letter is not JSON: {error}") from None
        if not isinstance(record, dict):
            raise ValueError("dead letter is not a JSON object")
        source = record.get("source")
        if source not in SOURCES:
            raise ValueError(f"dead letter source is {source!r}")
        return cls(
            reason=str(record.get("reason") or ""),
            source=source,
            market=_opt_str(record.get("market")),
            table=_opt_str(record.get("table")),
            received_at_us=_opt_int(record.get("received_at_us")),
            frame=_frame(record),
            symbol=_opt_str(record.get("symbol")),
            connection=_opt_str(record.get("connection")),
            run=_opt_str(record.get("run")),
            seq=_opt_int(record.get("seq")),
            dead_at_us=_opt_int(record.get("dead_at_us")) or 0,
        )


def _frame(record: dict[str, Any]) -> bytes:
    for text_key, b64_key in (("frame", "frame_b64"), ("envelope", "envelope_b64")):
        if isinstance(record.get(text_key), str):
            return str(record[text_key]).encode("utf-8")
        if isinstance(record.get(b64_key), str):
            try:
                return base64.b64decode(record[b64_key], validate=True)
            except binascii.Error as error:
                raise ValueError(f"dead letter {b64_key} is not base64: {error}") from None
    raise ValueError("dead letter has no frame")


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: object) -> int | None:
    return value if type(value) is int else None


class _Pipeline(Protocol):
    def rpush(self, name: str, *values: bytes) -> object: ...

    def hincrby(self, name: str, key: str, amount: int = 1) -> object: ...


def push(pipe: _Pipeline, letters: Sequence[DeadLetter]) -> None:
    """Queue `letters` onto the dead-letter list and count them per source (`deadletters{source}`).

    Only queues commands: call it on a MULTI pipeline (sync or asyncio) and execute that, so the
    letters and their count land together with whatever else the pipeline commits.
    """
    if not letters:
        return
    pipe.rpush(keys.DEADLETTER, *(letter.to_json() for letter in letters))
    per_source: dict[str, int] = {}
    for letter in letters:
        per_source[letter.source] = per_source.get(letter.source, 0) + 1
    for source, count in per_source.items():
        counters.incr(pipe, "deadletters", source, amount=count)


class _ListReader(Protocol):
    def lrange(self, name: str, start: int, end: int) -> Any: ...


def read(client: _ListReader, start: int = 0, stop: int = -1) -> list[DeadLetter]:
    """The dead letters from index `start` to `stop` (inclusive, as LRANGE), oldest first."""
    return [DeadLetter.from_json(raw) for raw in client.lrange(keys.DEADLETTER, start, stop)]
