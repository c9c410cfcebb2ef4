"""`collector book`: the sans-I/O engine on recorded real sequences, and rebuilds from real PostgreSQL.

Rows reach the database through the real path (`tests.bookdata`). Diffs and snapshots come from the
fake exchange's own book objects (`DepthGen`, and `DepthReplay` over the recorded real data), whose
snapshots are consistent with their diff chains by construction.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import orjson
import pytest

from collector.book import BeforeFirstSnapshot, Diff, InsideGap, LocalBook, Outcome, book_at, store
from collector.book.engine import Market, is_stale
from collector.book.replay import iso
from collector.db.connection import connect
from collector.db.init import init_db
from collector.fake.recordings import (
    DepthReplay,
    load_recordings,
)
from collector.settings import Settings
from tests.bookdata import (
    BASE_MS,
    book_database,
    cli,
    diff_envelope,
    generate,
    rebuild,
    recorded_depth,
    snapshot_envelope,
    store_rows,
    to_time,
)

db = pytest.fixture(book_database, name="db")


# --- the engine on the recorded real sequences ------------------------------------------------------


def _replay_book(market: Market, symbol: str, events: int) -> tuple[int, list[list[str]], list[list[str]]]:
    """The fake's own book for a recorded symbol after `events` of its diffs, all levels."""
    replay = DepthReplay(load_recordings().books[(market, symbol)])
    for _ in range(events):
        replay.next(BASE_MS)
    return replay.snapshot(10_000)


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_engine_syncs_recorded_real_sequences(market: Market) -> None:
    """Recorded snapshot + every recorded diff: 1-5 stale ones dropped, then all apply without a gap."""
    for symbol, body, events in recorded_depth(market):
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
    for symbol, body, events in recorded_depth("futures"):
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
    recording = generate(market, "BTCUSDT", 300, snapshots_after=(4, 154))
    store_rows(settings, *recording.envelopes())
    (_, first_id, _, _), (later_time, later_id, bids, asks) = recording.snapshots
    at = to_time(recording.diffs[154][0] + 10)  # after diff 154, before the later snapshot's time
    result = rebuild(settings, market, "BTCUSDT", at)
    assert result.snapshot.last_update_id == first_id
    assert result.applied == (150 if market == "spot" else 151)  # USD-M re-applies diff 4 (u == lastUpdateId)
    assert result.followed and result.last_update_id == later_id
    assert result.top() == ([tuple(x) for x in bids], [tuple(x) for x in asks])
    # At the later snapshot's own time the book starts from it, and is the same.
    again = rebuild(settings, market, "BTCUSDT", to_time(later_time))
    reapplied = 0 if market == "spot" else 1
    assert (again.snapshot.last_update_id, again.applied, again.top()) == (later_id, reapplied, result.top())


@pytest.mark.parametrize(("market", "symbol"), [("spot", "NKNUSDT"), ("futures", "SUSHIUSDT")])
def test_rebuild_of_recorded_real_data_equals_next_snapshot(
    db: Settings, market: Market, symbol: str
) -> None:
    """Real snapshot + real diffs (stale ones too) equal the snapshot the fake serves at the same id."""
    recorded = load_recordings().books[(market, symbol)]
    _, body, events = next(r for r in recorded_depth(market) if r[0] == symbol)
    stale = events[: len(events) - len(recorded.events)]
    replay = DepthReplay(recorded)
    k = 120  # diffs applied before the next snapshot is served
    diffs = [diff_envelope(market, symbol, orjson.dumps(e), e["E"] + 5) for e in stale]
    # The fake replays the recording: at the recorded times its events are the recorded ones.
    diffs += [
        diff_envelope(market, symbol, replay.next(e["E"]).data, e["E"] + 5) for e in recorded.events[:k]
    ]
    next_id, next_bids, next_asks = replay.snapshot(1000)
    diffs += [
        diff_envelope(market, symbol, replay.next(e["E"]).data, e["E"] + 5) for e in recorded.events[k:]
    ]
    first_time = stale[0]["E"]  # any time before the first applied diff
    e_k = recorded.events[k - 1]["E"]
    snapshots = [
        snapshot_envelope(market, symbol, body["lastUpdateId"], body["bids"], body["asks"], first_time),
        snapshot_envelope(market, symbol, next_id, next_bids, next_asks, e_k + 1),
    ]
    store_rows(db, diffs, snapshots)
    result = rebuild(db, market, symbol, to_time(e_k))
    assert result.snapshot.last_update_id == body["lastUpdateId"] and result.applied == k
    assert result.last_update_id == next_id == recorded.events[k - 1]["u"]
    bids, asks = result.top()
    # The snapshot is limited to 1000 levels a side; the rebuilt book may know more beyond them.
    assert len(bids) >= len(next_bids) and len(asks) >= len(next_asks)
    assert bids[: len(next_bids)] == [tuple(x) for x in next_bids]
    assert asks[: len(next_asks)] == [tuple(x) for x in next_asks]


def test_time_before_any_snapshot_exits_2(db: Settings, tmp_path: Path) -> None:
    """A time before the first snapshot, or a symbol without snapshots: one line on stderr, exit 2."""
    recording = generate("spot", "BTCUSDT", 20, snapshots_after=(4,))
    store_rows(db, *recording.envelopes())
    first_time = recording.snapshots[0][0]
    before = recording.diffs[4][0] - 1  # before diff 4 too, which pins the snapshot earlier than its time
    done = cli(db, tmp_path, "spot", "btcusdt", "--at", str(before))
    assert done.returncode == 2 and done.stdout == ""
    # The book is known from diff 4, which carries the snapshot's lastUpdateId, before its stored time.
    assert (recording.diffs[4][0], recording.diffs[4][2]) == (first_time - 50, recording.snapshots[0][1])
    assert done.stderr.splitlines() == [
        f"collector: {iso(to_time(before))} is before the first spot BTCUSDT book: the stored depth "
        f"snapshots give one from {iso(to_time(before + 1))}"
    ]
    done = cli(db, tmp_path, "futures", "BTCUSDT", "--at", str(first_time))
    assert done.returncode == 2
    assert (
        done.stderr == "collector: no futures BTCUSDT depth snapshot is stored, so no book can be rebuilt\n"
    )
    with pytest.raises(BeforeFirstSnapshot):
        rebuild(db, "spot", "BTCUSDT", to_time(before))


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_withheld_diff_is_a_gap(db: Settings, tmp_path: Path, market: Market) -> None:
    """A diff missing between snapshot and time: "inside a gap" with both ids and the resync, exit 2."""
    recording = generate(market, "ETHUSDT", 120, snapshots_after=(4, 90))
    missing = 40
    store_rows(db, *recording.envelopes(withhold=frozenset({missing})))
    last_good_e, _, last_good_u = recording.diffs[missing - 1][:3]
    next_e, next_first_u = recording.diffs[missing + 1][:2]
    resync_time, resync_id = recording.snapshots[1][:2]
    for at_ms in (recording.diffs[missing][0], recording.diffs[60][0]):  # just at the hole, and after it
        with pytest.raises(InsideGap) as raised:
            rebuild(db, market, "ETHUSDT", to_time(at_ms))
        gap = raised.value.gap
        assert (gap.last_good_u, gap.next_first_u, gap.resync_update_id) == (
            last_good_u,
            next_first_u,
            resync_id,
        )
        assert (gap.detected_at, gap.resynced_at) == (to_time(next_e + 5), to_time(resync_time))
    done = cli(db, tmp_path, market, "ETHUSDT", "--at", iso(to_time(recording.diffs[60][0])))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"collector: {iso(to_time(recording.diffs[60][0]))} falls inside a gap of {market} ETHUSDT depth "
        f"(last good u={last_good_u} at {iso(to_time(last_good_e))}, next U={next_first_u}, "
        f"detected at {iso(to_time(next_e + 5))}; "
        f"resynced at {iso(to_time(resync_time))} by snapshot {resync_id})"
    ]
    # The instant the message names is the last one the book is exact at: --at it answers.
    assert cli(db, tmp_path, market, "ETHUSDT", "--at", iso(to_time(last_good_e))).returncode == 0
    # After the resync the book is whole again.
    assert cli(db, tmp_path, market, "ETHUSDT", "--at", str(resync_time)).returncode == 0


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_long_silence_is_quiet_market_or_gap(db: Settings, market: Market) -> None:
    """No diff for 10 min after TIME: the next diff decides, chaining (quiet market) or not (a gap)."""
    quiet = generate(market, "DOGEUSDT", 50, snapshots_after=(4,), pause=(30, 600_000))
    holed = generate(market, "LTCUSDT", 50, snapshots_after=(4,), pause=(30, 600_000))
    store_rows(db, *quiet.envelopes())
    store_rows(db, *holed.envelopes(withhold=frozenset({30})))
    at = to_time(quiet.diffs[29][0] + 300_000)  # in the silence, far beyond the streamed window
    result = rebuild(db, market, "DOGEUSDT", at)
    assert result.followed and result.last_update_id == quiet.diffs[29][2]
    with pytest.raises(InsideGap) as raised:
        rebuild(db, market, "LTCUSDT", at)
    assert (raised.value.gap.last_good_u, raised.value.gap.next_first_u) == (
        holed.diffs[29][2],
        holed.diffs[31][1],
    )


def test_gap_report_takes_the_ledger_row(db: Settings) -> None:
    """With a matching `depth_gaps` row, the report gives the ledger's detection time and cause."""
    recording = generate("futures", "SOLUSDT", 60, snapshots_after=(4,))
    store_rows(db, *recording.envelopes(withhold=frozenset({30})))
    detected = to_time(recording.diffs[31][0] + 2)
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
        rebuild(db, "futures", "SOLUSDT", to_time(recording.diffs[40][0]))
    assert (raised.value.gap.detected_at, raised.value.gap.cause) == (detected, "sequence")
    assert "cause: sequence; no later snapshot resyncs it)" in str(raised.value)


def test_duplicate_diff_from_two_connections_is_skipped(db: Settings) -> None:
    """The same U/u stored twice (two connections, different E) is skipped once, not taken for a gap."""
    recording = generate("spot", "BNBUSDT", 80, snapshots_after=(4, 70))
    diffs, snapshots = recording.envelopes()
    e, _, u, data = recording.diffs[33]
    second_copy = data.replace(b'"E":%d' % e, b'"E":%d' % (e + 3))
    store_rows(db, [*diffs, diff_envelope("spot", "BNBUSDT", second_copy, e + 9)], snapshots)
    conn = connect(db, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM depth_updates WHERE final_update_id = %s", (u,))
        assert cur.fetchone()[0] == 2
    conn.close()
    later_time, later_id, bids, asks = recording.snapshots[1]
    result = rebuild(db, "spot", "BNBUSDT", to_time(later_time - 1))
    assert (result.duplicates, result.last_update_id) == (1, later_id)
    assert result.top() == ([tuple(x) for x in bids], [tuple(x) for x in asks])


def test_cli_prints_table_and_json(db: Settings, tmp_path: Path) -> None:
    """Text: a headline and a two-sided ladder; --json: the same facts, levels in Binance's strings."""
    recording = generate("futures", "XRPUSDT", 50, snapshots_after=(4, 30, 49))
    store_rows(db, *recording.envelopes())
    first_time, first_id = recording.snapshots[0][:2]
    later_time, later_id, bids, asks = recording.snapshots[1]
    as_of = iso(to_time(recording.diffs[30][0]))  # the last diff at or before the time
    at = str(later_time - 1)
    done = cli(db, tmp_path, "futures", "XRPUSDT", "--at", at, "--json", "--depth", "5")
    assert done.returncode == 0 and done.stderr == ""
    assert (
        json.loads(done.stdout)
        == {
            "market": "futures",
            "symbol": "XRPUSDT",
            "at": iso(to_time(later_time - 1)),
            "as_of": as_of,
            "last_update_id": later_id,
            "snapshot": {"last_update_id": first_id, "time": iso(to_time(first_time))},
            "diffs_applied": 27,  # diffs 4 to 30: USD-M applies the one ending at lastUpdateId
            "diffs_skipped": {"stale": 0, "duplicate": 0},
            "bids": bids[:5],
            "asks": asks[:5],
        }
    )
    done = cli(db, tmp_path, "futures", "XRPUSDT", "--at", at)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 12
    assert lines[0] == (
        f"futures XRPUSDT at {iso(to_time(later_time - 1))}: last_update_id={later_id} as of {as_of},"
        f" from snapshot {first_id} at {iso(to_time(first_time))} + 27 diffs (skipped 0 stale, 0 duplicate)"
    )
    assert lines[1].split() == ["bid", "qty", "bid", "|", "ask", "ask", "qty"]
    assert lines[2].split() == [bids[0][1], bids[0][0], "|", asks[0][0], asks[0][1]]


def test_large_range_streams_through_a_named_cursor(db: Settings) -> None:
    """20,000 diffs come 500 a round trip from a server-side cursor; peak memory < 1/5 of loading them."""
    count = 20_000
    recording = generate("spot", "ADAUSDT", count, snapshots_after=(0,))
    store_rows(db, *recording.envelopes())
    snapshot_id = recording.snapshots[0][1]
    conn = connect(db)
    with store.read_transaction(conn):
        diffs = store.stream_diffs(
            conn, "spot", "ADAUSDT", snapshot_id, to_time(0), to_time(BASE_MS * 2), batch_rows=500
        )
        next(diffs)
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM pg_cursors")
            assert cur.fetchall() == [("collector_book_diffs",)]
        diffs.close()
    tracemalloc.start()
    try:
        result = book_at(conn, "spot", "ADAUSDT", to_time(recording.diffs[-1][0]), batch_rows=500)
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with store.read_transaction(conn):
            loaded = list(
                store.stream_diffs(conn, "spot", "ADAUSDT", snapshot_id, to_time(0), to_time(BASE_MS * 2))
            )
        _, loaded_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        conn.close()
    assert result.applied == len(loaded) - 1 == count - 1  # diff 0 is in the snapshot (stale)
    assert result.last_update_id == recording.diffs[-1][2]
    assert streamed_peak < loaded_peak / 5, (streamed_peak, loaded_peak)
