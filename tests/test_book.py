"""`collector book`: the sans-I/O engine on recorded real sequences, and rebuilds from real PostgreSQL.

Rows reach the database through the real path (envelopes in the Redis queues, drained by `Drainer`).
Diffs and snapshots come from the fake exchange's own book objects (`DepthGen`, and `DepthReplay`
over the recorded real data), whose snapshots are consistent with their diff chains by construction.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from collector.book import BeforeFirstSnapshot, Diff, InsideGap, LocalBook, Outcome, book_at, store
from collector.book.engine import Market, is_stale
from collector.book.replay import from_ms, iso
from collector.db.connection import connect
from collector.db.init import init_db
from collector.drain import Drainer
from collector.fake.generators import DepthGen
from collector.fake.recordings import (
    DEFAULT_RECORDINGS_DIR,
    HTTP_FILES,
    WS_FILES,
    DepthReplay,
    load_recordings,
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


# --- recording: rows shaped as the collector stores them ------------------------------------------


def _diff_envelope(market: Market, symbol: str, data: bytes, received_ms: int) -> bytes:
    frame = b'{"stream":"' + f"{symbol.lower()}@depth@100ms".encode() + b'","data":' + data + b"}"
    return make_envelope(market, received_ms * 1000, frame)


def _snapshot_envelope(
    market: Market, symbol: str, last_update_id: int, bids: Any, asks: Any, time_ms: int
) -> bytes:
    """A REST body stored with exchange time `time_ms`: spot's is its receive time, USD-M's its `E`."""
    body: dict[str, Any] = {"lastUpdateId": last_update_id}
    received_ms = time_ms
    if market == "futures":
        body |= {"E": time_ms, "T": time_ms - 3}
        received_ms = time_ms + 5
    body |= {"bids": bids, "asks": asks}
    return make_envelope(market, received_ms * 1000, orjson.dumps(body), symbol=symbol)


@dataclass
class Recording:
    """Diffs (E, U, u, payload) and snapshots of one symbol, ready to be queued."""

    market: Market
    symbol: str
    diffs: list[tuple[int, int, int, bytes]] = field(default_factory=list)
    snapshots: list[tuple[int, int, list[list[str]], list[list[str]]]] = field(default_factory=list)

    def envelopes(self, withhold: frozenset[int] = frozenset()) -> tuple[list[bytes], list[bytes]]:
        diffs = [
            _diff_envelope(self.market, self.symbol, data, e + 5)
            for i, (e, _, _, data) in enumerate(self.diffs)
            if i not in withhold
        ]
        snapshots = [
            _snapshot_envelope(self.market, self.symbol, last, bids, asks, t)
            for t, last, bids, asks in self.snapshots
        ]
        return diffs, snapshots


def _generate(
    market: Market, symbol: str, count: int, snapshots_after: tuple[int, ...], pause: tuple[int, int] = (0, 0)
) -> Recording:
    """`count` diffs from the fake's generator, a full-depth snapshot right after each listed index.

    `pause` = (i, ms): diffs from the i-th on come `ms` later (a quiet market, or a recorder down).
    """
    gen = DepthGen(market, symbol, seed=11)
    recording = Recording(market, symbol)
    for i in range(count):
        now = BASE_MS + STEP_MS * i + (pause[1] if i >= pause[0] > 0 else 0)
        data = gen.next(now).data
        event = orjson.loads(data)
        recording.diffs.append((now, event["U"], event["u"], data))
        if i in snapshots_after:
            last, bids, asks = gen.snapshot(1000)  # 200 levels a side on the grid: the full book
            recording.snapshots.append((now + SNAPSHOT_LAG_MS, last, bids, asks))
    return recording


def _store(settings: Settings, diffs: list[bytes], snapshots: list[bytes]) -> None:
    """Queue the envelopes and drain them into PostgreSQL, as the Celery drain task does."""
    client = redis.Redis.from_url(settings.redis_url)
    drainer = Drainer(settings, client, lambda: connect(settings))
    for table, envelopes in (("depth_updates", diffs), ("depth_snapshots", snapshots)):
        if envelopes:
            client.rpush(keys.queue(table), *envelopes)
            result = drainer.drain(table)
            assert (result.dead_letters, result.remaining) == (0, 0)
    client.close()


def _at(ms: int) -> datetime:
    return from_ms(ms)


def _rebuild(settings: Settings, market: Market, symbol: str, at: datetime | str, **kwargs: Any) -> Any:
    conn = connect(settings)
    try:
        return book_at(conn, market, symbol, at, **kwargs)
    finally:
        conn.close()


def _cli(settings: Settings, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COLLECTOR, "book", *args],
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_FACTOR,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url},
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Settings]:
    init_db(settings)
    yield settings


# --- the engine on the recorded real sequences ------------------------------------------------------


def _recorded(market: Market) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(symbol, REST snapshot body, every recorded diff of the symbol) from the cryptofeed files."""
    frames = parse_ws_lines((DEFAULT_RECORDINGS_DIR / WS_FILES[market]).read_text().splitlines())
    bodies = parse_http_lines((DEFAULT_RECORDINGS_DIR / HTTP_FILES[market]).read_text().splitlines())
    for symbol, body in sorted(bodies.items()):
        events = [
            f["data"] for f in frames if f["data"].get("e") == "depthUpdate" and f["data"]["s"] == symbol
        ]
        yield symbol, body, events


def _replay_book(market: Market, symbol: str, events: int) -> tuple[int, list[list[str]], list[list[str]]]:
    """The fake's own book for a recorded symbol after `events` of its diffs, all levels."""
    replay = DepthReplay(load_recordings().books[(market, symbol)])
    for _ in range(events):
        replay.next(BASE_MS)
    return replay.snapshot(10_000)


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_engine_syncs_recorded_real_sequences(market: Market) -> None:
    """Recorded snapshot + every recorded diff: 1-5 stale ones dropped, then all apply without a gap."""
    for symbol, body, events in _recorded(market):
        book = LocalBook.from_snapshot(market, body)
        outcomes = [book.apply(Diff.from_event(event)) for event in events]
        start = outcomes.index(Outcome.APPLIED)
        assert 1 <= start <= 5, symbol
        assert outcomes == [Outcome.STALE] * start + [Outcome.APPLIED] * (len(events) - start), symbol
        assert book.update_id == events[-1]["u"]
        last, bids, asks = _replay_book(market, symbol, len(events) - start)
        assert (book.update_id, *book.top()) == (last, [tuple(x) for x in bids], [tuple(x) for x in asks])


def test_engine_applies_futures_diff_ending_at_last_update_id() -> None:
    """USD-M: 3 of 4 recorded first diffs have u == lastUpdateId: applied, where spot's rule drops them."""
    exact = []
    for symbol, body, events in _recorded("futures"):
        book = LocalBook.from_snapshot("futures", body)
        first = next(e for e in events if book.apply(Diff.from_event(e)) is Outcome.APPLIED)
        if first["u"] == body["lastUpdateId"]:
            exact.append(symbol)
            assert is_stale("spot", body["lastUpdateId"], Diff.from_event(first))
            assert not is_stale("futures", body["lastUpdateId"], Diff.from_event(first))
    assert sorted(exact) == ["AKROUSDT", "CTKUSDT", "KEEPUSDT"]


def test_engine_gaps_duplicates_and_levels() -> None:
    """Holes (spot U > u+1, USD-M pu != u) are gaps that leave the book; repeats are skipped; "0" removes."""
    spot = LocalBook("spot", 100, [["1.50", "2"]], [["1.60", "3"]])
    assert spot.apply(Diff(99, 100, None, 1, [["1.50", "9"]], [])) is Outcome.STALE
    assert (
        spot.apply(Diff(101, 103, None, 2, [["1.5000", "4"], ["1.40", "0"]], [["1.60", "0"]]))
        is Outcome.APPLIED
    )
    assert spot.apply(Diff(101, 103, None, 3, [["1.50", "7"]], [])) is Outcome.DUPLICATE
    assert spot.apply(Diff(105, 106, None, 4, [["1.50", "8"]], [])) is Outcome.GAP
    assert (spot.update_id, spot.top()) == (103, ([("1.5000", "4")], []))  # one level per exact price
    futures = LocalBook("futures", 500, [["10", "1"]], [])
    assert futures.apply(Diff(490, 500, 480, 1, [["10", "2"]], [])) is Outcome.APPLIED  # U <= L <= u
    assert futures.apply(Diff(510, 520, 500, 2, [["11", "1"]], [])) is Outcome.APPLIED  # ids skip; pu chains
    assert futures.apply(Diff(521, 530, 519, 3, [["12", "1"]], [])) is Outcome.GAP  # U == u + 1 is not enough
    assert futures.top(1) == ([("11", "1")], [])


# --- rebuilds from PostgreSQL ----------------------------------------------------------------------


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_rebuild_equals_later_snapshot(settings_each_mode: Settings, market: Market) -> None:
    """An earlier snapshot + 150 stored diffs equals, level for level, the later full snapshot (same id)."""
    settings = settings_each_mode
    init_db(settings)
    recording = _generate(market, "BTCUSDT", 300, snapshots_after=(4, 154))
    _store(settings, *recording.envelopes())
    (_, first_id, _, _), (later_time, later_id, bids, asks) = recording.snapshots
    at = _at(recording.diffs[154][0] + 10)  # after diff 154, before the later snapshot's time
    result = _rebuild(settings, market, "BTCUSDT", at)
    assert result.snapshot.last_update_id == first_id
    assert result.applied == (150 if market == "spot" else 151)  # USD-M re-applies diff 4 (u == lastUpdateId)
    assert result.followed and result.last_update_id == later_id
    assert result.top() == ([tuple(x) for x in bids], [tuple(x) for x in asks])
    # At the later snapshot's own time the book starts from it, and is the same.
    again = _rebuild(settings, market, "BTCUSDT", _at(later_time))
    reapplied = 0 if market == "spot" else 1
    assert (again.snapshot.last_update_id, again.applied, again.top()) == (later_id, reapplied, result.top())


@pytest.mark.parametrize(("market", "symbol"), [("spot", "NKNUSDT"), ("futures", "SUSHIUSDT")])
def test_rebuild_of_recorded_real_data_equals_next_snapshot(
    db: Settings, market: Market, symbol: str
) -> None:
    """Real snapshot + real diffs (stale ones too) equal the snapshot the fake serves at the same id."""
    recorded = load_recordings().books[(market, symbol)]
    _, body, events = next(r for r in _recorded(market) if r[0] == symbol)
    stale = events[: len(events) - len(recorded.events)]
    replay = DepthReplay(recorded)
    k = 120  # diffs applied before the next snapshot is served
    diffs = [_diff_envelope(market, symbol, orjson.dumps(e), e["E"] + 5) for e in stale]
    # The fake replays the recording: at the recorded times its events are the recorded ones.
    diffs += [
        _diff_envelope(market, symbol, replay.next(e["E"]).data, e["E"] + 5) for e in recorded.events[:k]
    ]
    next_id, next_bids, next_asks = replay.snapshot(1000)
    diffs += [
        _diff_envelope(market, symbol, replay.next(e["E"]).data, e["E"] + 5) for e in recorded.events[k:]
    ]
    first_time = stale[0]["E"]  # any time before the first applied diff
    e_k = recorded.events[k - 1]["E"]
    snapshots = [
        _snapshot_envelope(market, symbol, body["lastUpdateId"], body["bids"], body["asks"], first_time),
        _snapshot_envelope(market, symbol, next_id, next_bids, next_asks, e_k + 1),
    ]
    _store(db, diffs, snapshots)
    result = _rebuild(db, market, symbol, _at(e_k))
    assert result.snapshot.last_update_id == body["lastUpdateId"] and result.applied == k
    assert result.last_update_id == next_id == recorded.events[k - 1]["u"]
    bids, asks = result.top()
    # The snapshot is limited to 1000 levels a side; the rebuilt book may know more beyond them.
    assert len(bids) >= len(next_bids) and len(asks) >= len(next_asks)
    assert bids[: len(next_bids)] == [tuple(x) for x in next_bids]
    assert asks[: len(next_asks)] == [tuple(x) for x in next_asks]


def test_time_before_any_snapshot_exits_2(db: Settings, tmp_path: Path) -> None:
    """A time before the first snapshot, or a symbol without snapshots: one line on stderr, exit 2."""
    recording = _generate("spot", "BTCUSDT", 20, snapshots_after=(4,))
    _store(db, *recording.envelopes())
    first_time = recording.snapshots[0][0]
    done = _cli(db, tmp_path, "spot", "btcusdt", "--at", str(first_time - 1))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"collector: {iso(_at(first_time - 1))} is before any snapshot: the first spot BTCUSDT depth "
        f"snapshot is at {iso(_at(first_time))}"
    ]
    done = _cli(db, tmp_path, "futures", "BTCUSDT", "--at", str(first_time))
    assert done.returncode == 2
    assert (
        done.stderr == "collector: no futures BTCUSDT depth snapshot is stored, so no book can be rebuilt\n"
    )
    with pytest.raises(BeforeFirstSnapshot):
        _rebuild(db, "spot", "BTCUSDT", _at(first_time - 1))


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_withheld_diff_is_a_gap(db: Settings, tmp_path: Path, market: Market) -> None:
    """A diff missing between snapshot and time: "inside a gap" with both ids and the resync, exit 2."""
    recording = _generate(market, "ETHUSDT", 120, snapshots_after=(4, 90))
    missing = 40
    _store(db, *recording.envelopes(withhold=frozenset({missing})))
    last_good_u = recording.diffs[missing - 1][2]
    next_e, next_first_u = recording.diffs[missing + 1][:2]
    resync_time, resync_id = recording.snapshots[1][:2]
    for at_ms in (recording.diffs[missing][0], recording.diffs[60][0]):  # just at the hole, and after it
        with pytest.raises(InsideGap) as raised:
            _rebuild(db, market, "ETHUSDT", _at(at_ms))
        gap = raised.value.gap
        assert (gap.last_good_u, gap.next_first_u, gap.resync_update_id) == (
            last_good_u,
            next_first_u,
            resync_id,
        )
        assert (gap.detected_at, gap.resynced_at) == (_at(next_e + 5), _at(resync_time))
    done = _cli(db, tmp_path, market, "ETHUSDT", "--at", iso(_at(recording.diffs[60][0])))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"collector: {iso(_at(recording.diffs[60][0]))} falls inside a gap of {market} ETHUSDT depth "
        f"(last good u={last_good_u}, next U={next_first_u}, detected at {iso(_at(next_e + 5))}; "
        f"resynced at {iso(_at(resync_time))} by snapshot {resync_id})"
    ]
    # After the resync the book is whole again.
    assert _cli(db, tmp_path, market, "ETHUSDT", "--at", str(resync_time)).returncode == 0


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_long_silence_is_quiet_market_or_gap(db: Settings, market: Market) -> None:
    """No diff for 10 min after TIME: the next diff decides, chaining (quiet market) or not (a gap)."""
    quiet = _generate(market, "DOGEUSDT", 50, snapshots_after=(4,), pause=(30, 600_000))
    holed = _generate(market, "LTCUSDT", 50, snapshots_after=(4,), pause=(30, 600_000))
    _store(db, *quiet.envelopes())
    _store(db, *holed.envelopes(withhold=frozenset({30})))
    at = _at(quiet.diffs[29][0] + 300_000)  # in the silence, far beyond the streamed window
    result = _rebuild(db, market, "DOGEUSDT", at)
    assert result.followed and result.last_update_id == quiet.diffs[29][2]
    with pytest.raises(InsideGap) as raised:
        _rebuild(db, market, "LTCUSDT", at)
    assert (raised.value.gap.last_good_u, raised.value.gap.next_first_u) == (
        holed.diffs[29][2],
        holed.diffs[31][1],
    )


def test_gap_report_takes_the_ledger_row(db: Settings) -> None:
    """With a matching `depth_gaps` row, the report gives the ledger's detection time and cause."""
    recording = _generate("futures", "SOLUSDT", 60, snapshots_after=(4,))
    _store(db, *recording.envelopes(withhold=frozenset({30})))
    detected = _at(recording.diffs[31][0] + 2)
    conn = connect(db, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('depth_gaps') IS NULL")
        if cur.fetchone()[0]:  # the ledger's layout as documented, where init-db does not create it yet
            cur.execute(
                "CREATE TABLE depth_gaps (detected_at timestamptz NOT NULL, market text NOT NULL,"
                " symbol text NOT NULL, last_update_id bigint, next_update_id bigint,"
                " resynced_at timestamptz, resync_update_id bigint, cause text NOT NULL)"
            )
        cur.execute(
            "INSERT INTO depth_gaps (detected_at, market, symbol, last_update_id, next_update_id, cause)"
            " VALUES (%s, 'futures', 'SOLUSDT', %s, %s, 'sequence')",
            (detected, recording.diffs[29][2], recording.diffs[31][1]),
        )
    conn.close()
    with pytest.raises(InsideGap) as raised:
        _rebuild(db, "futures", "SOLUSDT", _at(recording.diffs[40][0]))
    assert (raised.value.gap.detected_at, raised.value.gap.cause) == (detected, "sequence")
    assert "cause: sequence; no later snapshot resyncs it)" in str(raised.value)


def test_duplicate_diff_from_two_connections_is_skipped(db: Settings) -> None:
    """The same U/u stored twice (two connections, different E) is skipped once, not taken for a gap."""
    recording = _generate("spot", "BNBUSDT", 80, snapshots_after=(4, 70))
    diffs, snapshots = recording.envelopes()
    e, _, u, data = recording.diffs[33]
    second_copy = data.replace(b'"E":%d' % e, b'"E":%d' % (e + 3))
    _store(db, [*diffs, _diff_envelope("spot", "BNBUSDT", second_copy, e + 9)], snapshots)
    conn = connect(db, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM depth_updates WHERE final_update_id = %s", (u,))
        assert cur.fetchone()[0] == 2
    conn.close()
    later_time, later_id, bids, asks = recording.snapshots[1]
    result = _rebuild(db, "spot", "BNBUSDT", _at(later_time - 1))
    assert (result.duplicates, result.last_update_id) == (1, later_id)
    assert result.top() == ([tuple(x) for x in bids], [tuple(x) for x in asks])


def test_cli_prints_table_and_json(db: Settings, tmp_path: Path) -> None:
    """Text: a headline and a two-sided ladder; --json: bids, asks, last_update_id, in Binance's strings."""
    recording = _generate("futures", "XRPUSDT", 50, snapshots_after=(4, 30, 49))
    _store(db, *recording.envelopes())
    later_time, later_id, bids, asks = recording.snapshots[1]
    final_bids, final_asks = recording.snapshots[2][2:]
    at = str(later_time - 1)
    done = _cli(db, tmp_path, "futures", "XRPUSDT", "--at", at, "--json", "--depth", "5")
    assert done.returncode == 0 and done.stderr == ""
    assert json.loads(done.stdout) == {"bids": bids[:5], "asks": asks[:5], "last_update_id": later_id}
    done = _cli(db, tmp_path, "futures", "XRPUSDT", "--at", at)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 12
    assert lines[0].startswith(f"futures XRPUSDT at {iso(_at(later_time - 1))}: last_update_id={later_id} (")
    assert lines[1].split() == ["bid", "qty", "bid", "|", "ask", "ask", "qty"]
    assert lines[2].split() == [bids[0][1], bids[0][0], "|", asks[0][0], asks[0][1]]
    # After the last stored diff: the book, and a note that nothing confirms it.
    done = _cli(
        db, tmp_path, "futures", "XRPUSDT", "--at", str(recording.diffs[-1][0] + 60_000), "--depth", "0"
    )
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2 + max(len(final_bids), len(final_asks))
    assert done.stderr.startswith("note: no diff is stored after ")


def test_large_range_streams_through_a_named_cursor(db: Settings) -> None:
    """20,000 diffs come 500 a round trip from a server-side cursor; peak memory < 1/5 of loading them."""
    count = 20_000
    recording = _generate("spot", "ADAUSDT", count, snapshots_after=(0,))
    _store(db, *recording.envelopes())
    snapshot_id = recording.snapshots[0][1]
    conn = connect(db)
    with store.read_transaction(conn):
        diffs = store.stream_diffs(
            conn, "spot", "ADAUSDT", snapshot_id, _at(0), _at(BASE_MS * 2), batch_rows=500
        )
        next(diffs)
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM pg_cursors")
            assert cur.fetchall() == [("collector_book_diffs",)]
        diffs.close()
    tracemalloc.start()
    try:
        result = book_at(conn, "spot", "ADAUSDT", _at(recording.diffs[-1][0]), batch_rows=500)
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with store.read_transaction(conn):
            loaded = list(store.stream_diffs(conn, "spot", "ADAUSDT", snapshot_id, _at(0), _at(BASE_MS * 2)))
        _, loaded_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        conn.close()
    assert result.applied == len(loaded) - 1 == count - 1  # diff 0 is in the snapshot (stale)
    assert result.last_update_id == recording.diffs[-1][2]
    assert streamed_peak < loaded_peak / 5, (streamed_peak, loaded_peak)
