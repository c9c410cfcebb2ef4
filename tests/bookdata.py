"""Recordings for the `collector book` tests: one symbol's diffs and snapshots, stored through the real path.

Rows reach the database as the collector's do (envelopes in the Redis queues, drained by `Drainer`).
Diffs and snapshots come from the fake exchange's own book (`DepthGen`), whose snapshots are
consistent with its diff chain by construction.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import redis

from collector.book import book_at
from collector.book.engine import Market
from collector.book.replay import from_ms
from collector.db.connection import connect
from collector.db.init import init_db
from collector.drain import Drainer
from collector.fake.generators import DepthGen
from collector.fake.recordings import (
    DEFAULT_RECORDINGS_DIR,
    HTTP_FILES,
    WS_FILES,
    parse_http_lines,
    parse_ws_lines,
)
from collector.queue import keys
from collector.queue.envelope import make_envelope
from collector.settings import Settings
from tests.conftest import TIMEOUT_FACTOR

COLLECTOR = str(Path(sys.executable).with_name("collector"))
BASE_MS = 1_764_000_000_000
STEP_MS = 100  # between generated diffs, as on a @100ms stream
SNAPSHOT_LAG_MS = 50  # a snapshot is taken this long after the diff it includes last


def book_database(settings: Settings) -> Settings:
    """The test database with the schema made by init-db; each book test module makes it its `db`
    fixture (`db = pytest.fixture(book_database, name="db")`)."""
    init_db(settings)
    return settings


def diff_envelope(market: Market, symbol: str, data: bytes, received_ms: int) -> bytes:
    frame = b'{"stream":"' + f"{symbol.lower()}@depth@100ms".encode() + b'","data":' + data + b"}"
    return make_envelope(market, received_ms * 1000, frame)


def snapshot_envelope(
    market: Market, symbol: str, last_update_id: int, bids: Any, asks: Any, time_ms: int, extra_us: int = 0
) -> bytes:
    """A REST body stored with exchange time `time_ms`: spot's is its receive time, USD-M's its `E`.

    `extra_us` is added to a spot receive time (microseconds, as the collector stamps it).
    """
    body: dict[str, Any] = {"lastUpdateId": last_update_id}
    received_us = time_ms * 1000 + extra_us
    if market == "futures":
        body |= {"E": time_ms, "T": time_ms - 3}
        received_us = (time_ms + 5) * 1000
    body |= {"bids": bids, "asks": asks}
    return make_envelope(market, received_us, orjson.dumps(body), symbol=symbol)


@dataclass
class Recording:
    """Diffs (E, U, u, payload) and snapshots (time, lastUpdateId, bids, asks) of one symbol."""

    market: Market
    symbol: str
    diffs: list[tuple[int, int, int, bytes]] = field(default_factory=list)
    snapshots: list[tuple[int, int, list[list[str]], list[list[str]]]] = field(default_factory=list)

    def envelopes(
        self, withhold: frozenset[int] = frozenset(), extra_us: int = 0
    ) -> tuple[list[bytes], list[bytes]]:
        diffs = [
            diff_envelope(self.market, self.symbol, data, e + 5)
            for i, (e, _, _, data) in enumerate(self.diffs)
            if i not in withhold
        ]
        snapshots = [
            snapshot_envelope(self.market, self.symbol, last, bids, asks, t, extra_us)
            for t, last, bids, asks in self.snapshots
        ]
        return diffs, snapshots


def generate(
    market: Market,
    symbol: str,
    count: int,
    snapshots_after: tuple[int, ...],
    pause: tuple[int, int] = (0, 0),
    lag_ms: int = SNAPSHOT_LAG_MS,
    start_ms: int = BASE_MS,
) -> Recording:
    """`count` diffs from the fake's generator, a full-depth snapshot `lag_ms` after each listed index.

    `pause` = (i, ms): diffs from the i-th on come `ms` later (a quiet market, or a recorder down).
    Every recording starts from the same seed, as the fake exchange does at each start: a second
    one stored after the first is a restarted exchange, whose update ids go back to the first's.
    """
    gen = DepthGen(market, symbol, seed=11)
    recording = Recording(market, symbol)
    for i in range(count):
        now = start_ms + STEP_MS * i + (pause[1] if i >= pause[0] > 0 else 0)
        data = gen.next(now).data
        event = orjson.loads(data)
        recording.diffs.append((now, event["U"], event["u"], data))
        if i in snapshots_after:
            last, bids, asks = gen.snapshot(1000)  # 200 levels a side on the grid: the full book
            recording.snapshots.append((now + lag_ms, last, bids, asks))
    return recording


def recorded_depth(market: Market) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(symbol, REST snapshot body, every recorded diff of the symbol) from the cryptofeed files."""
    frames = parse_ws_lines((DEFAULT_RECORDINGS_DIR / WS_FILES[market]).read_text().splitlines())
    bodies = parse_http_lines((DEFAULT_RECORDINGS_DIR / HTTP_FILES[market]).read_text().splitlines())
    for symbol, body in sorted(bodies.items()):
        events = [
            f["data"] for f in frames if f["data"].get("e") == "depthUpdate" and f["data"]["s"] == symbol
        ]
        yield symbol, body, events


def store_rows(
    settings: Settings, diffs: list[bytes], snapshots: list[bytes], gaps: list[bytes] | None = None
) -> None:
    """Queue the envelopes and drain them into PostgreSQL, as the Celery drain task does.

    `gaps`: the stream process's `depth_gaps` records (`DepthGap.envelope()`).
    """
    client = redis.Redis.from_url(settings.redis_url)
    drainer = Drainer(settings, client, lambda: connect(settings))
    tables = (("depth_updates", diffs), ("depth_snapshots", snapshots), ("depth_gaps", gaps or []))
    for table, envelopes in tables:
        if envelopes:
            client.rpush(keys.queue(table), *envelopes)
            result = drainer.drain(table)
            assert (result.dead_letters, result.remaining) == (0, 0)
    client.close()


def to_time(ms: int) -> datetime:
    return from_ms(ms)


def rebuild(settings: Settings, market: Market, symbol: str, when: datetime | str, **kwargs: Any) -> Any:
    conn = connect(settings)
    try:
        return book_at(conn, market, symbol, when, **kwargs)
    finally:
        conn.close()


def cli(settings: Settings, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COLLECTOR, "book", *args],
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_FACTOR,
        cwd=cwd,
        env={
            "PATH": "/usr/bin:/bin",
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            # A git worktree sharing another checkout's environment imports its own code this way.
            **{name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ},
        },
    )


def levels(rows: list[list[str]]) -> list[tuple[str, ...]]:
    """A snapshot side as `LocalBook.top` returns it."""
    return [tuple(x) for x in rows]
