"""The continuous drain loop and the queue shards, in this process: real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import orjson
import psycopg2
import pytest
import redis
import redis.asyncio

from collector.audit import RunBalance, format_audit
from collector.db.connection import connect
from collector.drain import Drainer
from collector.drain_loop import DrainLoop, Outcome, pick_order
from collector.queue import keys
from collector.queue.batches import BatchQueue, inflight_length
from collector.queue.keys import shard_of_run, shard_run
from collector.queue.loops import LoopSlot, node_most, running_loops
from collector.queue.shards import present_lanes, shard_of, shard_of_stream, wait_for_work
from collector.settings import Settings, load_settings
from collector.streams.sink import Sink, SinkOptions
from tests import factories
from tests.processes import wait_until


def _count(conn: psycopg2.extensions.connection, table: str) -> int:
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*), count(DISTINCT (market, symbol, aggregate_trade_id)) FROM {table}")
        total, distinct = cur.fetchone()
        assert total == distinct
        return int(total)


class _Running:
    """A DrainLoop on a thread of this process, stopped (as a warm shutdown would) by `stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.client = redis.Redis.from_url(settings.redis_url)
        self.waiter = redis.Redis.from_url(settings.redis_url)
        self._stop = threading.Event()
        self.outcome: Outcome | None = None
        self.loop = DrainLoop(
            settings,
            self.client,
            lambda: connect(settings),
            wait=lambda timeout_s: wait_for_work(self.waiter, timeout_s),
            stopping=self._stop.is_set,
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.outcome = self.loop.run()

    def stop(self) -> Outcome | None:
        self._stop.set()
        self.client.rpush(keys.DRAIN_WAKE, b"1")  # the in-process loop has no signal to cut its wait
        self._thread.join(timeout=60)
        assert not self._thread.is_alive()
        self.client.close()
        self.waiter.close()
        return self.outcome


def _blocked_on_redis(client: redis.Redis) -> bool:
    """Some connection is blocked in BLPOP on the wake list (the idle loop waits on Redis, not a timer)."""
    return any(c.get("cmd") == "blpop" for c in client.client_list())


def test_shard_choice_is_stable_and_spreads_symbols() -> None:
    """A symbol always maps to one shard; 100 symbols use every shard; one shard is shard 0; the audit
    run of shard k > 0 names it, and `collector audit` finds the shard again from the run."""
    symbols = [f"sym{i}usdt" for i in range(100)]
    assert [shard_of(s, 4) for s in symbols] == [shard_of(s, 4) for s in symbols]
    assert {shard_of(s, 4) for s in symbols} == {0, 1, 2, 3}
    assert {shard_of(s, 1) for s in symbols} == {0}
    assert shard_of_stream("btcusdt@aggTrade", 4) == shard_of_stream("btcusdt@depth@100ms", 4)
    assert shard_run("r1-2", 0) == "r1-2" and shard_run("r1-2", 3) == "r1-2.s3"
    assert shard_of_run("agg_trades", "r1-2") == "agg_trades" == keys.shard_name("agg_trades", 0)
    assert shard_of_run("agg_trades", "r1-2.s3") == "agg_trades:s3" == keys.shard_name("agg_trades", 3)
    assert keys.queue("agg_trades") == "collector:queue:agg_trades"  # QUEUE_SHARDS=1: the names of before
    assert keys.queue("agg_trades", 2) == "collector:queue:agg_trades:s2"


def test_shards_are_served_in_turn() -> None:
    """After serving one shard the loop looks first at the next one, wrapping round."""
    lanes = [("a", 0), ("a", 1), ("b", 0)]
    assert pick_order(lanes, None) == lanes
    assert pick_order(lanes, ("a", 0)) == [("a", 1), ("b", 0), ("a", 0)]
    assert pick_order(lanes, ("b", 0)) == lanes
    assert pick_order(lanes, ("a", 5)) == [("b", 0), ("a", 0), ("a", 1)]  # a shard gone from the list


def test_audit_pending_is_counted_per_shard() -> None:
    """Envelopes still queued in shard 1 count for shard 1's run, not for the table's latest run."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    balances = [
        RunBalance("agg_trades", "r1-1", 10, 10, 10, 0, 0, 0, start),
        RunBalance("agg_trades", "r1-1.s1", 4, 4, 4, 0, 0, 0, start),
    ]
    queued = {"r1-1/agg_trades": 10, "r1-1.s1/agg_trades": 7}
    text = format_audit(balances, [], queued, {"agg_trades": 0, "agg_trades:s1": 3})
    assert [line.split()[-1] for line in text.splitlines()[1:3]] == ["balanced", "balanced"], text
    text = format_audit(balances, [], queued, {"agg_trades": 3, "agg_trades:s1": 0})
    assert "3 not accounted for yet" in text, text


def test_loop_slots_hold_across_processes_and_expire(redis_conn: redis.Redis) -> None:
    """DRAIN_LOOPS slots at most; a released slot is free again, and so is one whose holder died."""
    first, second = LoopSlot(redis_conn, 1, 30_000), LoopSlot(redis_conn, 1, 30_000)
    assert first.acquire() and not second.acquire()
    assert first.renew() and running_loops(redis_conn, 0) == [first.member]
    first.release()
    assert not first.renew() and second.acquire()
    dying = LoopSlot(redis_conn, 2, 200)  # its process is "killed": never renewed nor released
    assert dying.acquire()
    wait_until(lambda: LoopSlot(redis_conn, 2, 30_000).acquire(), 10, "the dead holder's slot to expire")


def test_a_worker_node_keeps_one_pool_process_free(redis_conn: redis.Redis) -> None:
    """Within DRAIN_LOOPS overall, one worker node runs at most its pool processes less one (at least
    one), so the alert task there always finds a process; another node takes the loops it may not."""
    assert [node_most(size, 4) for size in (None, 1, 2, 3, 8)] == [4, 1, 1, 2, 4]
    first = LoopSlot(redis_conn, 4, 30_000, "ingest@a", node_most(2, 4))
    assert first.acquire() and not LoopSlot(redis_conn, 4, 30_000, "ingest@a", node_most(2, 4)).acquire()
    assert LoopSlot(redis_conn, 4, 30_000, "ingest@b", node_most(2, 4)).acquire()
    first.release()
    assert LoopSlot(redis_conn, 4, 30_000, "ingest@a", node_most(2, 4)).acquire()


def test_sink_sends_each_symbol_to_one_shard_numbered_per_shard(redis_url: str) -> None:
    """With QUEUE_SHARDS=3 the stream process puts each stream's events on its symbol's shard, in
    order, numbers them 1..n per shard, records the last number per shard run, and wakes the drains."""
    symbols = [f"s{i}usdt" for i in range(12)]

    async def run() -> str:
        client = redis.asyncio.Redis.from_url(redis_url)
        sink = Sink(client, SinkOptions(0.05, 10_000, 1_000_000, queue_shards=3), run="r7-1")
        for i in range(120):
            stream = f"{symbols[i % 12]}@aggTrade"
            sink.push_event(
                "agg_trades", "spot", 1000 + i, b'{"stream":"%s","i":%d}' % (stream.encode(), i), stream
            )
        sink.push("depth_gaps", b'{"market":"spot","received_at_us":1,"frame":{}}')  # no symbol: shard 0
        await sink.flush()
        await client.aclose()
        return sink.run_id

    run_id = asyncio.run(run())
    client = redis.Redis.from_url(redis_url)
    seen: dict[str, int] = {}
    for shard in range(3):
        items = [orjson.loads(raw) for raw in client.lrange(keys.queue("agg_trades", shard), 0, -1)]
        assert items, f"shard {shard} is empty"
        assert [item["seq"] for item in items] == list(range(1, len(items) + 1))
        assert {item["run"] for item in items} == {shard_run(run_id, shard)}
        for item in items:
            stream = item["frame"]["stream"]
            assert seen.setdefault(stream, shard) == shard == shard_of_stream(stream, 3)
        orders = [item["frame"]["i"] for item in items]
        assert orders == sorted(orders)
        queued = client.hget(keys.AUDIT_QUEUED, f"{shard_run(run_id, shard)}/agg_trades")
        assert int(queued or 0) == len(items)
    assert client.llen(keys.queue("depth_gaps")) == 1 and client.llen(keys.DRAIN_WAKE) >= 1
    client.close()


def test_loop_drains_every_shard_then_waits_on_redis_for_more(
    settings: Settings, redis_conn: redis.Redis, db
) -> None:
    """One loop drains the shards of the setting and one beyond it (QUEUE_SHARDS lowered), recovers a
    batch a dead drain left in flight, then blocks on Redis; work pushed later is stored without any
    other run; stopping returns after the last batch, with nothing in flight and no slot or lock held."""
    own = load_settings(queue_shards=2, drain_batch_max_rows=50)
    for shard, first in ((0, 0), (1, 1000), (5, 2000)):  # shard 5: from a time of QUEUE_SHARDS=6
        redis_conn.rpush(
            keys.queue("agg_trades", shard), *[factories.agg_trade(first + i) for i in range(300)]
        )
    assert BatchQueue(redis_conn, "agg_trades", 5).claim(40) is not None  # a drain died holding it
    assert present_lanes(redis_conn, ["agg_trades"], 2) == [
        ("agg_trades", 0),
        ("agg_trades", 1),
        ("agg_trades", 5),
    ]
    running = _Running(own)
    try:
        wait_until(lambda: _count(db, "agg_trades") == 900, 60, "every shard drained")
        wait_until(lambda: _blocked_on_redis(redis_conn), 30, "the idle loop blocked on the wake list")
        redis_conn.rpush(keys.queue("agg_trades", 1), *[factories.agg_trade(5000 + i) for i in range(10)])
        redis_conn.rpush(keys.DRAIN_WAKE, b"1")  # what the stream process's flush adds
        wait_until(lambda: _count(db, "agg_trades") == 910, 30, "the later push, drained by the same loop")
    finally:
        outcome = running.stop()
    assert outcome == "stopped"
    assert all(inflight_length(redis_conn, "agg_trades", (k,)) == 0 for k in (0, 1, 5))
    assert not redis_conn.keys("collector:lock:drain:*") and not running_loops(redis_conn, 0)
    assert int(redis_conn.hget(keys.metric("drain_loop_runs"), "started") or 0) == 1


def test_one_shot_drain_takes_every_shard_and_a_loop_leaves_a_busy_shard(
    settings: Settings, redis_conn: redis.Redis, db
) -> None:
    """`collector trigger drain` drains each shard of its table; a shard locked by another drain is left
    to it (the others are drained), and no INFO line says so."""
    own = load_settings(queue_shards=2)
    for shard in (0, 1):
        redis_conn.rpush(
            keys.queue("agg_trades", shard), *[factories.agg_trade(100 * shard + i) for i in range(50)]
        )
    holder = redis_conn.lock(keys.drain_lock("agg_trades", 1), timeout=30)
    assert holder.acquire(blocking=False)
    drainer = Drainer(own, redis_conn, lambda: connect(own))
    result = drainer.drain("agg_trades")
    assert result.lock_busy and result.inserted == 50 and result.remaining == 50
    holder.release()
    assert drainer.drain("agg_trades").inserted == 50 and _count(db, "agg_trades") == 100


def test_a_failed_write_gives_the_shard_up_and_the_next_loop_recovers_it(
    settings: Settings, redis_conn: redis.Redis, db
) -> None:
    """A write PostgreSQL refuses ends the loop with the error, its batch in flight and every lock and
    slot given back at once (not left to expire); the next loop writes the batch, once."""
    redis_conn.rpush(keys.queue("agg_trades"), *[factories.agg_trade(i) for i in range(100)])
    with db.cursor() as cur:
        cur.execute("ALTER TABLE agg_trades RENAME TO agg_trades_away")
    waiter = redis.Redis.from_url(settings.redis_url)

    def loop() -> DrainLoop:
        return DrainLoop(
            settings,
            redis_conn,
            lambda: connect(settings),
            wait=lambda timeout_s: wait_for_work(waiter, timeout_s),
            stopping=lambda: (
                redis_conn.llen(keys.queue("agg_trades")) + inflight_length(redis_conn, "agg_trades") == 0
            ),
        )

    with pytest.raises(psycopg2.errors.UndefinedTable):
        loop().run()
    assert inflight_length(redis_conn, "agg_trades") == 100
    assert not redis_conn.keys("collector:lock:drain:*") and not running_loops(redis_conn, 0)
    with db.cursor() as cur:
        cur.execute("ALTER TABLE agg_trades_away RENAME TO agg_trades")
    assert loop().run() == "stopped"
    assert _count(db, "agg_trades") == 100 and inflight_length(redis_conn, "agg_trades") == 0
    waiter.close()
