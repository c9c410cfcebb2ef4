"""Redis contracts defined once in collector.queue: the connection-state record and the locks."""

from __future__ import annotations

import redis

from collector.binance.streams import ConnectionPlan
from collector.queue import keys
from collector.queue.connections import ConnectionRecord, read_connections
from collector.queue.locks import alerts_lock, drain_lock
from collector.streams.state import ConnectionState
from tests.processes import wait_until


def _state() -> ConnectionState:
    plan = ConnectionPlan(
        "futures-market-0", "futures", "market", "ws://127.0.0.1:1/stream", ("a@aggTrade", "b@aggTrade")
    )
    state = ConnectionState.from_plan(plan)
    state.state = "backoff"
    state.connected_since_us = 10
    state.last_message_us = 20
    state.messages = 3
    state.reconnects = 2
    state.last_error = "ConnectionClosed: 1006"
    return state


def test_the_reader_gets_back_what_the_stream_process_wrote() -> None:
    """`/health` reads exactly the record the stream process mirrors to `keys.CONNECTIONS`."""
    state = _state()
    (record,) = read_connections({state.id.encode(): state.to_json()})
    assert record == state.record()
    assert (record.connection_id, record.state, record.streams) == (
        "futures-market-0",
        "backoff",
        ("a@aggTrade", "b@aggTrade"),
    )


def test_unreadable_or_partial_records_are_reported_not_fatal() -> None:
    """A value that is not JSON becomes state `unknown` saying so; missing fields take their defaults."""
    records = read_connections({b"z": b"{broken", b"a": b'{"state":"connected","messages":"7"}'})
    assert [r.connection_id for r in records] == ["a", "z"]
    assert records[0] == ConnectionRecord("a", state="connected", messages=7)
    assert records[1].state == "unknown" and records[1].last_error == "unreadable state in Redis"


def test_a_lock_has_one_holder_and_only_the_holder_releases_it(redis_conn: redis.Redis) -> None:
    """A second taker is refused; release and extend by a holder whose lock expired change nothing."""
    first, second = drain_lock(redis_conn, "agg_trades", 30), drain_lock(redis_conn, "agg_trades", 30)
    assert first.acquire() and not second.acquire()
    assert first.extend() and 29_000 < int(redis_conn.pttl(keys.drain_lock("agg_trades"))) <= 30_000
    assert first.release() and not first.release()

    expiring, successor = alerts_lock(redis_conn, 50), alerts_lock(redis_conn, 60_000)
    assert expiring.acquire()
    wait_until(lambda: not redis_conn.exists(keys.ALERTS_LOCK), 5, "the 50 ms lock expired", interval_s=0.01)
    assert successor.acquire()
    assert not expiring.extend() and not expiring.release()
    assert redis_conn.get(keys.ALERTS_LOCK) == successor.token.encode()


def test_a_lock_taken_by_redis_py_is_respected(redis_conn: redis.Redis) -> None:
    """The same SET NX semantics as redis-py's Lock: either one keeps the other out."""
    holder = redis_conn.lock(keys.drain_lock("depth_updates"), timeout=30)
    assert holder.acquire(blocking=False)
    assert not drain_lock(redis_conn, "depth_updates", 30).acquire()
    holder.release()
    assert drain_lock(redis_conn, "depth_updates", 30).acquire()
