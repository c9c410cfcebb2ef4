"""Every event accounted for: the stream process numbers what it queues, the drains record what they
consumed, and envelopes Redis lost show up as holes, with their count and receive times."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import redis

from collector.audit import SeqRange, contiguous_ranges, find_losses
from collector.db.connection import connect
from collector.fake.server import FakeExchange
from collector.queue import keys
from collector.queue.envelope import make_envelope, tag_of
from collector.settings import Settings
from collector.web.health import assess, check_postgres, now_us
from tests.processes import wait_until
from tests.test_gaps_e2e import _drain_all, _run

COLLECTOR = str(Path(sys.executable).with_name("collector"))


def test_tags_and_ranges() -> None:
    """The audit tag is read from the envelope head; a batch's numbers become contiguous ranges per run."""
    tagged = make_envelope("spot", 1_000, b'{"x":1}', audit=b',"run":"r9-1","seq":42')
    assert tag_of(tagged) == ("r9-1", 42, 1_000)
    assert tag_of(make_envelope("spot", 1_000, b'{"x":1}', symbol="BTCUSDT")) is None  # REST: not audited
    tags = [("a", 3, 30), ("a", 1, 10), ("a", 2, 20), ("a", 5, 50), ("b", 1, 11)]
    assert contiguous_ranges(tags) == [
        SeqRange("a", 1, 3, 10, 30),
        SeqRange("a", 5, 5, 50, 50),
        SeqRange("b", 1, 1, 11, 11),
    ]


def test_nothing_lost_in_a_normal_run(settings: Settings, tmp_path: Path) -> None:
    """Everything the stream process queued is drained: per table, drained == highest number, no hole."""
    client = redis.Redis.from_url(settings.redis_url)
    with FakeExchange(rate=300.0) as fake:
        streams = _run(settings, fake, tmp_path)
        try:
            wait_until(lambda: client.llen(keys.queue("agg_trades")) > 300, 60, "trades")
        finally:
            assert streams.stop() == 0, streams.log()
    _drain_all(settings)
    conn = connect(settings)
    with conn.cursor() as cur:
        assert find_losses(cur, datetime.now(UTC) - timedelta(hours=1)) == []
        cur.execute(
            "SELECT table_name, sum(last_seq - first_seq + 1), max(last_seq) FROM ingest_ranges GROUP BY 1"
        )
        balances = cur.fetchall()
    conn.close()
    assert {t for t, _, _ in balances} >= {"agg_trades", "depth_updates", "mark_prices"}
    assert all(drained == highest for _, drained, highest in balances)
    printed = subprocess.run([COLLECTOR, "audit"], capture_output=True, text=True, timeout=60)
    lines = printed.stdout.splitlines()
    assert lines[0].split()[:6] == ["TABLE", "RUN", "QUEUED", "DRAINED", "PENDING", "LOST"]
    rows = [line.split() for line in lines[1:-1]]
    assert len(rows) >= 4 and all(row[-1] == "balanced" and row[2] == row[3] for row in rows), printed.stdout
    assert lines[-1] == "nothing lost"


def test_events_redis_lost_are_reported_with_count_and_interval(settings: Settings, tmp_path: Path) -> None:
    """Redis loses a queue while the collector runs: the drains find the hole, `collector audit` and
    /health report exactly how many events of which table were lost, and when they were received."""
    client = redis.Redis.from_url(settings.redis_url)
    with FakeExchange(rate=300.0) as fake:
        streams = _run(settings, fake, tmp_path)
        try:
            wait_until(lambda: client.llen(keys.queue("agg_trades")) > 200, 60, "trades")
            _drain_all(settings)  # some drained before the loss, so the hole has a lower edge
            wait_until(lambda: client.llen(keys.queue("agg_trades")) > 100, 60, "more trades")
            pipe = client.pipeline(transaction=True)
            pipe.llen(keys.queue("agg_trades"))
            pipe.delete(keys.queue("agg_trades"))  # what a Redis restarted without persistence does
            lost, _ = pipe.execute()
            wait_until(lambda: client.llen(keys.queue("agg_trades")) > 100, 60, "trades after the loss")
        finally:
            assert streams.stop() == 0, streams.log()
    _drain_all(settings)
    conn = connect(settings)
    with conn.cursor() as cur:
        losses = find_losses(cur, datetime.now(UTC) - timedelta(hours=1))
    conn.close()
    assert [(loss.table, loss.count) for loss in losses] == [("agg_trades", lost)]
    assert losses[0].after_received < losses[0].before_received
    printed = subprocess.run([COLLECTOR, "audit"], capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    assert f"({lost} events), received between" in printed.stdout
    assert printed.stdout.strip().endswith(f"{lost} events lost")
    trades = next(line.split() for line in printed.stdout.splitlines() if line.startswith("agg_trades "))
    assert trades[5] == f"{lost:,}" and trades[-1] == "balanced"  # queued = drained + lost
    error, _, recent = check_postgres(settings)
    assert error is None and recent == losses
    from collector.web.health import HealthSnapshot

    report = assess(HealthSnapshot(redis_up=False, postgres_up=True, losses=recent), now_us(), settings)
    assert any(r.startswith(f"lost {lost} agg_trades events received between") for r in report.reasons)
    db = psycopg2.connect(settings.database_url)
    with db.cursor() as cur:  # the rows that did arrive are all there, once
        cur.execute("SELECT count(*), count(DISTINCT (market, symbol, aggregate_trade_id)) FROM agg_trades")
        stored, distinct = cur.fetchone()
    db.close()
    assert stored == distinct > 0


def test_a_batch_spanning_two_runs_books_each_runs_rows_to_it(settings: Settings) -> None:
    """A restart inside one drain batch: each run is credited with exactly its own stored rows."""
    from collector.audit import drained_balances
    from collector.db.init import init_db
    from collector.drain import Drainer, split_by_run
    from collector.queue.envelope import split_envelope
    from tests.factories import agg_trade

    def tagged(i: int, run: str, seq: int) -> bytes:
        parts = split_envelope(agg_trade(i))
        assert parts is not None
        audit = f',"run":"{run}","seq":{seq}'.encode()
        return make_envelope("futures", parts.received_at_us, parts.frame, audit=audit)

    first = [tagged(i, "r1", i + 1) for i in range(30)]
    second = [tagged(100 + i, "r2", i + 1) for i in range(20)]
    assert split_by_run(first + second) == [first, second]
    assert split_by_run([agg_trade(1), *first[:2]]) == [[agg_trade(1)], first[:2]]

    init_db(settings)
    client = redis.Redis.from_url(settings.redis_url)
    # One repeat of run 1: written in run 1's part, where its number is already in the range (drained
    # counts each number of a part once) and its row is a duplicate.
    client.rpush(keys.queue("agg_trades"), *first, *second, first[0])
    Drainer(settings, client, lambda: connect(settings)).drain("agg_trades")
    conn = connect(settings)
    with conn.cursor() as cur:
        balances = {b.run: b for b in drained_balances(cur, datetime(2000, 1, 1, tzinfo=UTC))}
    conn.close()
    assert (balances["r1"].drained, balances["r1"].rows_inserted, balances["r1"].rows_duplicate) == (
        30,
        30,
        1,
    )
    assert (balances["r2"].drained, balances["r2"].rows_inserted, balances["r2"].rows_duplicate) == (
        20,
        20,
        0,
    )
