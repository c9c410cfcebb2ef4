"""`collector book` at the edges of what was recorded: either side of a gap, and after the last event.

The rule under test: a book is given for every time at which the stored rows pin it exactly, and
refused (exit 2, one line) only strictly after the last diff before a hole and before the first diff
that meets the resync snapshot, or strictly after the last recorded event.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from collector.book import AfterRecording, BeforeFirstSnapshot, Diff, InsideGap, LocalBook, SnapshotRef
from collector.book.engine import Market
from collector.book.replay import Replay, Verdict, from_ms, iso
from collector.fake.recordings import DepthReplay, load_recordings
from collector.settings import Settings
from tests.bookdata import (
    book_database,
    cli,
    diff_envelope,
    generate,
    levels,
    rebuild,
    recorded_depth,
    snapshot_envelope,
    store_rows,
    to_time,
)

db = pytest.fixture(book_database, name="db")


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_last_diff_before_a_gap_gives_the_exact_book(db: Settings, tmp_path: Path, market: Market) -> None:
    """At the E of the last diff before a hole the book is exact (the hole is later); 1 ms on, refused."""
    recording = generate(market, "ETHUSDT", 120, snapshots_after=(4, 39, 90))
    store_rows(db, *recording.envelopes(withhold=frozenset({40})))
    last_e, _, last_u, _ = recording.diffs[39]
    _, proof_id, proof_bids, proof_asks = recording.snapshots[1]  # the generator's book after diff 39
    result = rebuild(db, market, "ETHUSDT", to_time(last_e))
    assert (result.last_update_id, result.as_of, result.gap_follows) == (last_u, to_time(last_e), True)
    assert result.top() == (levels(proof_bids), levels(proof_asks)) and proof_id == last_u
    with pytest.raises(InsideGap):
        rebuild(db, market, "ETHUSDT", to_time(last_e + 1))
    done = cli(db, tmp_path, market, "ETHUSDT", "--at", iso(to_time(last_e)))
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"note: the stored diffs break right after {iso(to_time(last_e))} (u={last_u}):"
        " the book is exact at that instant, not after it\n"
    )


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_book_resumes_at_the_diff_that_meets_the_snapshot(db: Settings, market: Market) -> None:
    """After a gap, and at the start, a book is known from the diff that pins a snapshot, before its time."""
    recording = generate(market, "ETHUSDT", 120, snapshots_after=(4, 90))
    store_rows(db, *recording.envelopes(withhold=frozenset({40})))
    for index, snapshot in ((90, recording.snapshots[1]), (4, recording.snapshots[0])):
        e, _, u, _ = recording.diffs[index]  # u == the snapshot's lastUpdateId: at E the book is it
        snapshot_time, snapshot_id, bids, asks = snapshot
        assert (u, e) == (snapshot_id, snapshot_time - 50)
        result = rebuild(db, market, "ETHUSDT", to_time(e))
        assert (result.snapshot.last_update_id, result.last_update_id) == (snapshot_id, snapshot_id)
        assert (result.as_of, result.followed) == (to_time(e), True)
        assert result.top() == (levels(bids), levels(asks))
    with pytest.raises(InsideGap):
        rebuild(db, market, "ETHUSDT", to_time(recording.diffs[90][0] - 1))
    with pytest.raises(BeforeFirstSnapshot):
        rebuild(db, market, "ETHUSDT", to_time(recording.diffs[4][0] - 1))


def test_resync_time_named_by_the_gap_message_gives_a_book(db: Settings, tmp_path: Path) -> None:
    """Spot snapshot times carry microseconds; the millisecond the message prints is the snapshot's own."""
    recording = generate("spot", "ETHUSDT", 120, snapshots_after=(4, 90))
    # Diff 90 (u == the resync's lastUpdateId) is lost too: only the snapshot's time starts the book.
    store_rows(db, *recording.envelopes(withhold=frozenset({40, 90}), extra_us=700))
    resync_ms, resync_id = recording.snapshots[1][:2]
    done = cli(db, tmp_path, "spot", "ETHUSDT", "--at", iso(to_time(recording.diffs[60][0])))
    assert done.returncode == 2
    assert f"resynced at {iso(to_time(resync_ms))} by snapshot {resync_id})" in done.stderr
    result = rebuild(db, "spot", "ETHUSDT", iso(to_time(resync_ms)))
    assert (result.snapshot.last_update_id, result.applied, result.followed) == (resync_id, 0, True)
    with pytest.raises(InsideGap):
        rebuild(db, "spot", "ETHUSDT", to_time(resync_ms - 1))


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_time_after_the_recording_exits_2(db: Settings, tmp_path: Path, market: Market) -> None:
    """After the last stored event: one line naming it, exit 2; at that event itself, the book."""
    recording = generate(market, "XRPUSDT", 50, snapshots_after=(4, 30, 49))
    store_rows(db, *recording.envelopes())
    last_e, _, last_u, _ = recording.diffs[49]
    final_time, final_id, bids, asks = recording.snapshots[2]  # taken after the last diff, same id
    done = cli(db, tmp_path, market, "xrpusdt", "--at", "2099-01-01")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        f"collector: 2099-01-01T00:00:00.000Z is after the recording: the last stored {market} XRPUSDT "
        f"depth event is at {iso(to_time(final_time))} (u={final_id})"
    ]
    between = to_time(last_e + 20)
    with pytest.raises(AfterRecording) as raised:
        rebuild(db, market, "XRPUSDT", between)
    assert str(raised.value) == (
        f"{iso(between)} is after the last stored {market} XRPUSDT depth event, at {iso(to_time(last_e))} "
        f"(u={last_u}), and before the next snapshot, at {iso(to_time(final_time))} (id {final_id}): "
        "no stored row says what the book was"
    )
    done = cli(db, tmp_path, market, "XRPUSDT", "--at", str(final_time), "--json", "--depth", "0")
    assert done.returncode == 0
    assert done.stderr == (
        f"note: no stored diff follows {iso(to_time(final_time))}:"
        " the book is exact at that instant, later ones are unknown\n"
    )
    book = json.loads(done.stdout)
    assert (book["as_of"], book["last_update_id"], book["bids"], book["asks"]) == (
        iso(to_time(final_time)),
        final_id,
        bids,
        asks,
    )
    assert rebuild(db, market, "XRPUSDT", to_time(last_e)).last_update_id == last_u


def _verdict(
    snapshot_ms: int, until_ms: int, diffs: list[tuple[int, int, int]]
) -> tuple[Verdict, int | None]:
    """Replay spot diffs (U, u, E) onto a snapshot with lastUpdateId 100: the verdict and `as_of_ms`."""
    replay = Replay(LocalBook("spot", 100), until_ms, SnapshotRef(100, from_ms(snapshot_ms)))
    for first_u, final_u, e in diffs:
        if not replay.feed(Diff(first_u, final_u, None, e, [], [])):
            break
    return replay.verdict(), replay.as_of_ms


def test_replay_verdicts_at_the_boundaries() -> None:
    """Exact at the E of the diff before a hole or the end, not 1 ms on; a snapshot time does not pin."""
    hole_after_101 = [(101, 101, 1100), (103, 103, 1300)]  # update 102 is lost
    assert _verdict(1000, 1100, hole_after_101) == (Verdict.BOOK, 1100)
    assert _verdict(1000, 1101, hole_after_101)[0] is Verdict.GAP
    # The one unsafe case, two diffs of a symbol in one millisecond: a hole seen at the same E is refused.
    assert _verdict(1000, 1100, [(101, 101, 1100), (103, 103, 1100)])[0] is Verdict.GAP
    assert _verdict(1000, 1000, [(103, 103, 1300)])[0] is Verdict.GAP  # lost right after the snapshot
    assert _verdict(1000, 1100, [(101, 101, 1100)]) == (Verdict.BOOK, 1100)  # the recording ends here
    assert _verdict(1000, 1101, [(101, 101, 1100)]) == (Verdict.AFTER, 1100)
    assert _verdict(1000, 1050, [(101, 101, 1100)]) == (Verdict.BOOK, 1000)  # followed: unchanged
    assert _verdict(1000, 1050, []) == (Verdict.AFTER, 1000)  # the snapshot alone, nothing after it
    assert _verdict(1000, 1000, []) == (Verdict.BOOK, 1000)
    # A snapshot stored after the time: pinned by a diff at or before it, else not yet.
    pins = [(100, 100, 900), (101, 101, 1000)]  # spot: u == lastUpdateId is stale yet shows the book
    assert _verdict(2000, 950, pins) == (Verdict.BOOK, 900)
    assert _verdict(2000, 899, pins) == (Verdict.UNPINNED, None)


@pytest.mark.parametrize(("market", "symbol"), [("spot", "NKNUSDT"), ("futures", "SUSHIUSDT")])
def test_recorded_real_data_either_side_of_a_gap(db: Settings, market: Market, symbol: str) -> None:
    """Real diffs, one lost: exact at the diff before it, refused 1 ms on, whole at the resync's diff."""
    recorded = load_recordings().books[(market, symbol)]
    body, events = next((b, e) for s, b, e in recorded_depth(market) if s == symbol)
    stale = events[: len(events) - len(recorded.events)]
    replay = DepthReplay(recorded)
    lost, resync_after = 60, 99  # the resync snapshot holds the book after event 99, stored 300 ms later
    diffs = [diff_envelope(market, symbol, orjson.dumps(e), e["E"] + 5) for e in stale]
    for i, event in enumerate(recorded.events):
        data = replay.next(event["E"]).data
        if i == lost - 1:
            before_id, before_bids, before_asks = replay.snapshot(1000)
        if i == resync_after:
            resync_id, resync_bids, resync_asks = replay.snapshot(1000)
        if i != lost:
            diffs.append(diff_envelope(market, symbol, data, event["E"] + 5))
    e_before, e_resync = recorded.events[lost - 1]["E"], recorded.events[resync_after]["E"]
    e_first = recorded.events[resync_after + 1]["E"]  # the first diff after the resync's state
    assert e_first < e_resync + 300  # older than the snapshot's stored time, as when a REST reply is slow
    store_rows(
        db,
        diffs,
        [
            snapshot_envelope(
                market, symbol, body["lastUpdateId"], body["bids"], body["asks"], stale[0]["E"]
            ),
            snapshot_envelope(market, symbol, resync_id, resync_bids, resync_asks, e_resync + 300),
        ],
    )
    for e, book_id, bids, asks in (
        (e_before, before_id, before_bids, before_asks),
        (e_resync, resync_id, resync_bids, resync_asks),
    ):
        result = rebuild(db, market, symbol, to_time(e))
        assert (result.last_update_id, result.as_of) == (book_id, to_time(e))
        top_bids, top_asks = result.top(1000)
        assert (top_bids[: len(bids)], top_asks[: len(asks)]) == (levels(bids), levels(asks))
    assert (
        rebuild(db, market, symbol, to_time(e_first)).last_update_id == recorded.events[resync_after + 1]["u"]
    )
    for refused in (e_before + 1, e_resync - 1):
        with pytest.raises(InsideGap):
            rebuild(db, market, symbol, to_time(refused))
