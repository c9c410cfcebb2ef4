"""`collector book` across an exchange restart whose update ids go back (two `make demo` runs on one var/).

The fake exchange starts every run from the same seed, so the second run's depth ids restart at the
first run's and climb through them again; an independent emulator, or a real exchange resetting its
ids after maintenance, does the same. Stored rows then hold two chains whose ids overlap, told apart
only by time. The stream process records the restart as a depth gap (cause `startup`) and resyncs;
the book must do the same: rebuilt from the last snapshot in time, refused inside the gap, exact
again from the resync.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from collector.book import Diff, InsideGap, LocalBook, SnapshotRef
from collector.book.engine import Market
from collector.book.replay import Replay, Verdict, from_ms, iso
from collector.fake.generators import DepthGen
from collector.gaps.depth import DepthTracker
from collector.settings import Settings
from tests.bookdata import (
    STEP_MS,
    Recording,
    book_database,
    cli,
    generate,
    levels,
    rebuild,
    store_rows,
    to_time,
)

SYMBOL = "ETHUSDT"
RUN1, RUN2 = 60, 150  # diffs per run: the second passes the first's last id at its diff 60
RESTART_MS = 180_000  # from run 1's last diff to run 2's first: within the 10 min a rebuild looks back
RECEIVE_MS = 5  # each diff is received this long after its E (as `Recording.envelopes` stamps it)


db = pytest.fixture(book_database, name="db")


def book_after(market: Market, count: int) -> tuple[int, list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The fake's own book after its first `count` diffs: (last u, bids, asks), every level."""
    gen = DepthGen(market, SYMBOL, seed=11)
    for _ in range(count):
        gen.next(0)
    last, bids, asks = gen.snapshot(1000)
    return last, levels(bids), levels(asks)


def restart_ledger(run1: Recording, run2: Recording) -> tuple[list[bytes], list[int]]:
    """The `depth_gaps` records the stream process queues for run 2, restarted with run 1's last id
    (saved at its clean stop), and each record's `resynced_at_us`; snapshots reach it when stored."""
    market = run2.market
    tracker = DepthTracker({(market, SYMBOL): run1.diffs[-1][2]})
    snapshots = list(run2.snapshots)
    envelopes: list[bytes] = []
    resynced: list[int] = []
    for e, first_u, final_u, data in run2.diffs:
        decided = []
        while snapshots and snapshots[0][0] < e + RECEIVE_MS:
            time_ms, snapshot_id = snapshots.pop(0)[:2]
            decided += tracker.on_snapshot(market, SYMBOL, snapshot_id, time_ms * 1000).records
        pu = orjson.loads(data).get("pu")
        decided += tracker.on_event(
            market, SYMBOL, first_u, final_u, pu, (e + RECEIVE_MS) * 1000, "c"
        ).records
        envelopes += [gap.envelope() for gap in decided]
        resynced += [gap.resynced_at_us for gap in decided if gap.resynced_at_us is not None]
    return envelopes, resynced


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_book_across_a_restart_whose_ids_go_back(db: Settings, tmp_path: Path, market: Market) -> None:
    """Run 1, the restart gap and run 2 each get the book of their own time; the gap is refused."""
    run1 = generate(market, SYMBOL, RUN1, snapshots_after=(4, 30, RUN1 - 1))
    run2_start = run1.diffs[-1][0] + RESTART_MS
    run2 = generate(market, SYMBOL, RUN2, snapshots_after=(5, 100), start_ms=run2_start)
    first_u = run2.diffs[0][1]
    assert first_u < run1.diffs[-1][2] < run2.diffs[RUN1][2]  # the ids go back, then pass run 1's
    gaps, resynced = restart_ledger(run1, run2)
    assert len(gaps) == 2 and len(resynced) == 1  # opened at run 2's first diff, closed by the resync
    diffs1, snapshots1 = run1.envelopes()
    diffs2, snapshots2 = run2.envelopes()
    store_rows(db, diffs1 + diffs2, snapshots1 + snapshots2, gaps)
    e1 = [row[0] for row in run1.diffs]
    e2 = [row[0] for row in run2.diffs]
    resync_time, resync_id = run2.snapshots[0][:2]

    def expect_book(at_ms: int, diffs: int, snapshot_id: int) -> None:
        last_u, bids, asks = book_after(market, diffs)
        result = rebuild(db, market, SYMBOL, to_time(at_ms))
        assert (result.last_update_id, result.snapshot.last_update_id) == (last_u, snapshot_id), at_ms
        assert result.top() == (bids, asks), at_ms

    # Run 1: its own book; at its last diff, exact, with the restart right after it.
    expect_book(e1[40] + 30, 41, run1.snapshots[1][1])
    expect_book(e1[-1], RUN1, run1.snapshots[1][1])
    last = rebuild(db, market, SYMBOL, to_time(e1[-1]))
    assert (last.followed, last.gap_follows, last.as_of) == (False, True, to_time(e1[-1]))

    # The restart gap: after run 1's last diff, and in run 2 before the diff that meets its resync.
    def message(good_ms: int) -> str:
        return (
            f"falls inside a gap of {market} {SYMBOL} depth (last good u={run1.diffs[-1][2]} at "
            f"{iso(to_time(good_ms))}, next U={first_u}, "
            f"detected at {iso(to_time(e2[0] + RECEIVE_MS))}, cause: startup; "
            f"resynced at {iso(to_time(resynced[0] // 1000))} by snapshot {resync_id})"
        )

    for inside in (e1[-1] + 1, e1[-1] + 60_000, e2[0], e2[3], e2[5] - 1):
        with pytest.raises(InsideGap) as raised:
            rebuild(db, market, SYMBOL, to_time(inside))
        # Named whichever snapshot the replay starts from: run 1's last diff, where the book is exact.
        assert str(raised.value) == f"{iso(to_time(inside))} {message(e1[-1])}"
    done = cli(db, tmp_path, market, SYMBOL, "--at", str(e2[3]))
    assert (done.returncode, done.stdout, done.stderr) == (
        2,
        "",
        f"collector: {iso(to_time(e2[3]))} {message(e1[-1])}\n",
    )
    # Run 2 from the diff that carries the resync's lastUpdateId (before its stored time), through the
    # ids run 1 had reached, and past them, from its later snapshot.
    assert resync_time == e2[5] + 50 and resync_id == run2.diffs[5][2]
    expect_book(e2[5], 6, resync_id)
    expect_book(e2[50], 51, resync_id)
    expect_book(e2[80] + STEP_MS // 2, 81, resync_id)
    expect_book(e2[120], 121, run2.snapshots[1][1])


def _replay(until_ms: int, diffs: list[tuple[int, int, int, str]]) -> Replay:
    """Spot diffs (U, u, E, quantity set at price 1) in time order onto a snapshot with
    lastUpdateId 100 stored at 2000 ms; the replay as `book_at` leaves it."""
    replay = Replay(LocalBook("spot", 100, [["1", "5"]]), until_ms, SnapshotRef(100, from_ms(2000)))
    for first_u, final_u, e, quantity in diffs:
        if not replay.feed(Diff(first_u, final_u, None, e, [["1", quantity]], [])):
            break
    return replay


def test_replay_ids_going_back_start_another_chain() -> None:
    """Before the snapshot's time an id going back drops what came before; after it, it is a break."""
    old = [(101, 101, 1000, "7"), (102, 102, 1100, "8")]  # another run's ids, as if they met the snapshot
    resumed = _replay(2500, [*old, (50, 50, 1500, "0"), (51, 100, 1600, "6"), (101, 101, 2500, "9")])
    assert (resumed.verdict(), resumed.applied, resumed.book.update_id) == (Verdict.BOOK, 1, 101)
    assert resumed.book.top() == ([("1", "9")], [])
    broken = _replay(3000, [(101, 101, 1000, "7"), (50, 50, 2500, "0")])
    assert broken.verdict() is Verdict.GAP and broken.gap is not None and broken.gap.next.u == 50
    # A later snapshot is not pinned by a diff of the chain before a restart that precedes its time.
    unpinned = _replay(1200, [*old, (101, 103, 1300, "1"), (50, 50, 1500, "0"), (51, 100, 1900, "6")])
    assert unpinned.verdict() is Verdict.UNPINNED
    # Ids that skip the snapshot's before its time are a hole only if no restart follows by then.
    skipped = _replay(2100, [(300, 300, 1000, "3"), (60, 100, 1500, "6"), (101, 101, 2100, "9")])
    assert (skipped.verdict(), skipped.gap, skipped.book.update_id) == (Verdict.BOOK, None, 101)
    holed = _replay(2100, [(300, 300, 1000, "3"), (301, 301, 1500, "6"), (302, 302, 2100, "9")])
    assert holed.verdict() is Verdict.GAP and holed.gap is not None and holed.gap.next.u == 300
