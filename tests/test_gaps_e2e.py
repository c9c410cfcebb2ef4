"""The gap ledger against the fake exchange's faults, with the real `collector streams` process:
every depth update id the exchange produced is either stored or inside a recorded gap, each gap is
followed by a resync snapshot of that symbol only, and no gap is recorded where nothing was missing."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis

from collector.db.connection import connect
from collector.db.init import init_db
from collector.drain import Drainer
from collector.fake.server import FakeExchange
from collector.queue import keys
from collector.settings import Settings
from tests.processes import Process, collector_env, stream_process, wait_until

DEPTH_SYMBOLS = [("spot", "BTCUSDT"), ("spot", "ETHUSDT"), ("futures", "BTCUSDT"), ("futures", "ETHUSDT")]


@pytest.fixture
def fake() -> Iterator[FakeExchange]:
    with FakeExchange(rate=300.0) as exchange:
        yield exchange


def _env(settings: Settings, fake: FakeExchange, **extra: str) -> dict[str, str]:
    return collector_env(
        settings,
        fake,
        WS_BACKOFF_INITIAL_S="0.05",
        WS_BACKOFF_MAX_S="0.5",
        STREAM_FLUSH_INTERVAL_MS="20",
        DEPTH_SNAPSHOT_LIMIT="100",
        **extra,
    )


def _drain_all(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    drainer = Drainer(settings, client, lambda: connect(settings))
    for table in keys.TABLES:
        drainer.drain(table)
    client.close()


def _rows(settings: Settings, sql: str, *params: Any) -> list[tuple]:
    conn = psycopg2.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def chain_breaks(settings: Settings, market: str, symbol: str) -> list[tuple[int, int]]:
    """(last good u, first U after) of every place the stored diffs of a symbol do not link up."""
    events = _rows(
        settings,
        "SELECT first_update_id, final_update_id, previous_final_update_id FROM depth_updates"
        " WHERE market = %s AND symbol = %s ORDER BY final_update_id",
        market,
        symbol,
    )
    breaks = []
    for (_, last_u, _), (first_u, _, previous_u) in itertools.pairwise(events):
        linked = previous_u == last_u if market == "futures" else first_u == last_u + 1
        if not linked:
            breaks.append((last_u, first_u))
    return breaks


def depth_gaps(settings: Settings) -> list[tuple]:
    return _rows(
        settings,
        "SELECT market, symbol, last_update_id, next_update_id, cause, resync_update_id"
        " FROM depth_gaps ORDER BY detected_at",
    )


def assert_every_break_is_a_recorded_gap(settings: Settings) -> None:
    """Each hole in the stored chains is a recorded gap with those bounds, and each gap a real hole."""
    recorded = {(m, s, last, nxt) for m, s, last, nxt, _, _ in depth_gaps(settings)}
    found = {(m, s, last, nxt) for m, s in DEPTH_SYMBOLS for last, nxt in chain_breaks(settings, m, s)}
    assert found == recorded


def assert_gaps_resynced_by_stored_snapshots(settings: Settings) -> None:
    for market, symbol, _, _, _, resync_id in depth_gaps(settings):
        assert resync_id is not None, f"{market} {symbol}: gap not resynced"
        snapshots = _rows(
            settings,
            "SELECT count(*) FROM depth_snapshots"
            " WHERE market_type = %s AND symbol = %s AND last_update_id = %s",
            market,
            symbol,
            resync_id,
        )
        assert snapshots == [(1,)], f"{market} {symbol}: resync snapshot {resync_id} not stored"


def _run(settings: Settings, fake: FakeExchange, tmp_path: Path, **extra: str) -> Process:
    init_db(settings)
    return stream_process(_env(settings, fake, **extra), tmp_path)


def _depth_flowing(client: redis.Redis, at_least: int) -> bool:
    return int(client.llen(keys.queue("depth_updates"))) >= at_least


def _more_depth(client: redis.Redis, count: int) -> None:
    """Wait for `count` more depth events than now: the chains go on after the fault."""
    target = int(client.llen(keys.queue("depth_updates"))) + count
    wait_until(lambda: _depth_flowing(client, target), 60, f"{count} more depth events")


def test_withheld_depth_events_open_a_gap_resynced_for_that_symbol_only(
    settings: Settings, fake: FakeExchange, tmp_path: Path
) -> None:
    """Depth events the exchange never sent: one gap per symbol with the exact bounds, then its resync."""
    client = redis.Redis.from_url(settings.redis_url)
    streams = _run(settings, fake, tmp_path)
    try:
        wait_until(lambda: _depth_flowing(client, 100), 60, "depth events")
        fake.withhold_depth("spot", "BTCUSDT", 5)
        fake.withhold_depth("futures", "ETHUSDT", 3)
        wait_until(lambda: client.llen(keys.queue("depth_gaps")) >= 4, 60, "two gaps opened and closed")
        _more_depth(client, 50)
    finally:
        assert streams.stop() == 0, streams.log()
    _drain_all(settings)
    withheld = fake.ledger()["withheld"]
    gaps = depth_gaps(settings)
    assert sorted((m, s, cause) for m, s, _, _, cause, _ in gaps) == [
        ("futures", "ETHUSDT", "sequence"),
        ("spot", "BTCUSDT", "sequence"),
    ]
    spot = next(g for g in gaps if g[0] == "spot")
    spot_withheld = [w for w in withheld if w["market"] == "spot"]
    assert (spot[2], spot[3]) == (spot_withheld[0]["U"] - 1, spot_withheld[-1]["u"] + 1)
    futures = next(g for g in gaps if g[0] == "futures")
    futures_withheld = [w for w in withheld if w["market"] == "futures"]
    assert futures[2] == futures_withheld[0]["pu"]
    assert_every_break_is_a_recorded_gap(settings)
    assert_gaps_resynced_by_stored_snapshots(settings)
    # Only those two symbols were resynced: no other snapshot was asked for.
    snapshots = _rows(settings, "SELECT DISTINCT market_type, symbol FROM depth_snapshots ORDER BY 1, 2")
    assert snapshots == [("futures", "ETHUSDT"), ("spot", "BTCUSDT")]
    assert "gaps.depth_resynced market=spot symbol=BTCUSDT" in streams.log()


def test_dropped_connections_record_outages_and_no_false_depth_gap(
    settings: Settings, fake: FakeExchange, tmp_path: Path
) -> None:
    """Every connection dropped: each stream's outage is recorded and closed; depth chains that carried
    on unbroken (the fake produced nothing meanwhile) get no gap."""
    client = redis.Redis.from_url(settings.redis_url)
    streams = _run(settings, fake, tmp_path)
    try:
        wait_until(lambda: _depth_flowing(client, 100), 60, "depth events")
        dropped = fake.drop_connections()
        wait_until(lambda: client.llen(keys.queue("stream_gaps")) >= 2 * 10, 60, "outages opened and closed")
    finally:
        assert streams.stop() == 0, streams.log()
    _drain_all(settings)
    outages = _rows(
        settings,
        "SELECT stream, cause, ended_at IS NOT NULL, extract(epoch FROM ended_at - started_at)"
        " FROM stream_gaps WHERE cause = 'disconnect'",
    )
    assert dropped == 3 and len(outages) == 10  # 4 spot + 4 futures market + 2 futures public streams
    assert all(closed and 0 <= seconds < 10 for _, _, closed, seconds in outages)
    assert_every_break_is_a_recorded_gap(settings)


def test_silent_connection_loses_events_inside_recorded_gaps(
    settings: Settings, fake: FakeExchange, tmp_path: Path
) -> None:
    """Connections that go silent: noticed in seconds, reopened; what they lost is inside the recorded
    outages and depth gaps, each depth gap resynced."""
    client = redis.Redis.from_url(settings.redis_url)
    streams = _run(settings, fake, tmp_path, WS_SILENCE_MIN_S="1")
    try:
        wait_until(lambda: _depth_flowing(client, 400), 60, "depth events")
        fake.silence(4.0)
        wait_until(lambda: "cause=silence" in streams.log(), 30, "silence noticed")
        wait_until(
            lambda: b"silence" in b"".join(client.lrange(keys.queue("stream_gaps"), 0, -1)), 30, "outage"
        )
        _more_depth(client, 100)
    finally:
        assert streams.stop() == 0, streams.log()
    _drain_all(settings)
    assert (
        _rows(settings, "SELECT count(*) FROM stream_gaps WHERE cause = 'silence' AND ended_at IS NOT NULL")[
            0
        ][0]
        >= 1
    )
    # The reopened connection's streams are judged afresh, not resubscribed for the old one's silence.
    assert "ws.stream_silent" not in streams.log()
    assert _rows(settings, "SELECT count(*) FROM stream_gaps WHERE cause = 'stream_silence'") == [(0,)]
    gaps = depth_gaps(settings)
    assert gaps and all(cause == "reconnect" for _, _, _, _, cause, _ in gaps)
    assert_every_break_is_a_recorded_gap(settings)
    assert_gaps_resynced_by_stored_snapshots(settings)


def test_server_shutdown_notice_is_a_handover_without_a_hole(
    settings: Settings, fake: FakeExchange, tmp_path: Path
) -> None:
    """A spot serverShutdown with notice: the replacement takes over before the close, nothing is lost."""
    client = redis.Redis.from_url(settings.redis_url)
    streams = _run(settings, fake, tmp_path)
    try:
        wait_until(lambda: _depth_flowing(client, 100), 60, "depth events")
        fake.server_shutdown(2.0, market="spot")
        wait_until(lambda: "reason=server shutdown notice" in streams.log(), 30, "the handover")
        _more_depth(client, 100)
    finally:
        assert streams.stop() == 0, streams.log()
    _drain_all(settings)
    assert depth_gaps(settings) == []
    assert _rows(settings, "SELECT count(*) FROM stream_gaps WHERE cause <> 'shutdown'") == [(0,)]
    assert_every_break_is_a_recorded_gap(settings)


def test_rotation_before_the_exchange_cut_leaves_no_hole(settings: Settings, tmp_path: Path) -> None:
    """The exchange cuts connections after a maximum age; replacing them before it leaves no outage and
    no depth gap, across several rotations."""
    client = redis.Redis.from_url(settings.redis_url)
    with FakeExchange(rate=300.0, max_connection_age_s=3.0) as fake:
        streams = _run(settings, fake, tmp_path, WS_ROTATE_AFTER_S="1.2")
        try:
            wait_until(lambda: streams.log().count("reason=age") >= 9, 60, "three rotations per connection")
            _more_depth(client, 50)
        finally:
            assert streams.stop() == 0, streams.log()
        closes = [c["server_close"] for c in fake.ledger()["connections"] if c["server_close"]]
    assert not [c for c in closes if c["cause"] == "max_age"], "the exchange had to cut a connection"
    _drain_all(settings)
    assert depth_gaps(settings) == []
    assert _rows(settings, "SELECT count(*) FROM stream_gaps WHERE cause <> 'shutdown'") == [(0,)]
    assert_every_break_is_a_recorded_gap(settings)


def test_without_rotation_the_exchange_cut_is_a_recorded_outage(settings: Settings, tmp_path: Path) -> None:
    """Left to the exchange's cut, each connection's streams have an outage, closed on reconnection."""
    client = redis.Redis.from_url(settings.redis_url)
    with FakeExchange(rate=300.0, max_connection_age_s=2.0) as fake:
        streams = _run(settings, fake, tmp_path)
        try:
            wait_until(lambda: streams.log().count("ws.disconnected") >= 3, 60, "the cuts")
            _more_depth(client, 50)
        finally:
            assert streams.stop() == 0, streams.log()
    _drain_all(settings)
    outages = _rows(
        settings,
        "SELECT count(*), bool_and(ended_at IS NOT NULL) FROM stream_gaps WHERE cause = 'disconnect'",
    )
    assert outages[0][0] >= 10 and outages[0][1]
    assert_every_break_is_a_recorded_gap(settings)
    assert_gaps_resynced_by_stored_snapshots(settings)


def test_a_crashed_stream_process_leaves_a_complete_ledger(settings: Settings, tmp_path: Path) -> None:
    """SIGKILL, then a new start: every stream has a `crash` outage from the last heartbeat to the new
    connection, every depth symbol a `crash` gap (no lower bound) resynced by its own snapshot."""
    import signal

    client = redis.Redis.from_url(settings.redis_url)
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with FakeExchange(rate=300.0) as fake:
        first = _run(settings, fake, tmp_path / "first")
        try:
            wait_until(lambda: _depth_flowing(client, 100), 60, "depth events")
            wait_until(lambda: client.hexists(keys.STREAM_SHARDS, "0/1"), 10, "a heartbeat")
        finally:
            first.signal_group(signal.SIGKILL)
            first.stop()
        second = stream_process(_env(settings, fake), tmp_path / "second")
        try:
            wait_until(lambda: "gaps.previous_run_crashed" in second.log(), 30, "the crash noticed")
            _more_depth(client, 100)
        finally:
            assert second.stop() == 0, second.log()
    _drain_all(settings)
    crash_outages = _rows(
        settings, "SELECT count(*), bool_and(ended_at > started_at) FROM stream_gaps WHERE cause = 'crash'"
    )
    assert crash_outages == [(10, True)]  # every planned stream
    gaps = depth_gaps(settings)
    assert sorted((m, s, last, cause) for m, s, last, _, cause, _ in gaps) == sorted(
        (m, s, None, "crash") for m, s in DEPTH_SYMBOLS
    )
    assert_gaps_resynced_by_stored_snapshots(settings)
