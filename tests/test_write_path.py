"""The drain's write path: COPY straight into the table, the staging table when a batch collides, and
rows rendered exactly (times, escapes), on TimescaleDB hypertables and plain PostgreSQL tables."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import psycopg2
import pytest
import redis

from collector.audit import RunBalance, SeqRange, check_ranges, drained_balances
from collector.db.connection import connect
from collector.db.copy import timestamp
from collector.db.init import init_db
from collector.drain import Drainer, build_rows, split_by_run, write_batch
from collector.errors import FrameError
from collector.queue import keys
from collector.queue.batches import BatchQueue, inflight_length
from collector.queue.envelope import make_envelope, split_envelope
from collector.settings import Settings
from tests import factories


@pytest.fixture
def db(settings_each_mode: Settings) -> Iterator[psycopg2.extensions.connection]:
    init_db(settings_each_mode)
    conn = connect(settings_each_mode, autocommit=True)
    yield conn
    conn.close()


def _tagged(envelope: bytes, run: str, seq: int) -> bytes:
    """`envelope` as the stream process of run `run` queues it, numbered `seq`."""
    parts = split_envelope(envelope)
    assert parts is not None
    audit = f',"run":"{run}","seq":{seq}'.encode()
    return make_envelope(parts.market, parts.received_at_us, parts.frame, parts.symbol, audit)


def _drain(settings: Settings, client: redis.Redis, table: str = "agg_trades") -> Drainer:
    drainer = Drainer(settings, client, lambda: connect(settings))
    drainer.drain(table)
    return drainer


def _balances(settings: Settings) -> dict[str, RunBalance]:
    conn = connect(settings)
    with conn.cursor() as cur:
        found = {b.run: b for b in drained_balances(cur, datetime(2000, 1, 1, tzinfo=UTC))}
    conn.close()
    return found


def _count(conn: psycopg2.extensions.connection, table: str = "agg_trades") -> int:
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return int(cur.fetchone()[0])


def test_batch_colliding_with_stored_rows_inserts_only_the_new_ones(
    settings_each_mode: Settings, redis_conn: redis.Redis, db, caplog: pytest.LogCaptureFixture
) -> None:
    """A restarted stream process re-receives trades already stored: the straight COPY collides, the
    batch goes through the staging table, and the audit books the repeats as duplicates of the new run."""
    settings = settings_each_mode
    first = [_tagged(factories.agg_trade(i), "r1", i + 1) for i in range(30)]
    again = [_tagged(factories.agg_trade(20 + i), "r2", i + 1) for i in range(25)]  # 10 seen, 15 new
    redis_conn.rpush(keys.queue("agg_trades"), *first)
    _drain(settings, redis_conn)
    redis_conn.rpush(keys.queue("agg_trades"), *again)
    with caplog.at_level("INFO", logger="collector.drain"):
        _drain(settings, redis_conn)
    assert any("drain.batch_collides" in r.getMessage() for r in caplog.records)
    assert _count(db) == 45
    balances = _balances(settings)
    assert (balances["r1"].drained, balances["r1"].rows_inserted, balances["r1"].rows_duplicate) == (
        30,
        30,
        0,
    )
    assert (balances["r2"].drained, balances["r2"].rows_inserted, balances["r2"].rows_duplicate) == (
        25,
        15,
        10,
    )
    assert int(redis_conn.hget(keys.metric("rows_duplicate"), "agg_trades")) == 10


def test_redelivered_batch_is_known_from_its_ranges_and_staged_at_once(
    settings_each_mode: Settings, redis_conn: redis.Redis, db, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch committed by a drain that died before acknowledging it is recognised by its ranges in
    `ingest_ranges`: the next drain stages it without first trying (and failing) the straight COPY."""
    settings = settings_each_mode
    envelopes = [_tagged(factories.agg_trade(i), "r1", i + 1) for i in range(40)]
    redis_conn.rpush(keys.queue("agg_trades"), *envelopes)
    batch = BatchQueue(redis_conn, "agg_trades").claim(40)
    assert batch is not None
    conn = connect(settings)
    write_batch(conn, "agg_trades", batch.items, build_rows("agg_trades", batch.items, False))
    conn.close()  # ... and the drain died here, before acknowledging
    redis_conn.rpush(keys.queue("agg_trades"), _tagged(factories.agg_trade(40), "r1", 41))
    with caplog.at_level("INFO", logger="collector.drain"):
        _drain(settings, redis_conn)
    assert not any("drain.batch_collides" in r.getMessage() for r in caplog.records)
    assert _count(db) == 41 and inflight_length(redis_conn, "agg_trades") == 0
    r1 = _balances(settings)["r1"]
    assert (r1.highest, r1.drained, r1.rows_inserted, r1.rows_duplicate) == (41, 81, 41, 40)


def test_gap_ledger_still_merges_its_records(
    settings_each_mode: Settings, redis_conn: redis.Redis, db
) -> None:
    """The gap ledger keeps its upsert: the closing record fills in the opening one, whichever comes first."""
    opened = {"started_at_us": 1_764_000_000_000_000, "stream": "btcusdt@aggTrade", "cause": "disconnect"}
    closed = opened | {"ended_at_us": 1_764_000_005_000_000, "connection": "c1"}
    for record in (opened, closed, opened):
        envelope = make_envelope("spot", 1_764_000_006_000_000, orjson.dumps(record))
        redis_conn.rpush(keys.queue("stream_gaps"), envelope)
        _drain(settings_each_mode, redis_conn, "stream_gaps")
    with db.cursor() as cur:
        cur.execute("SELECT count(*), max(ended_at) - min(started_at) FROM stream_gaps")
        count, length = cur.fetchone()
    assert count == 1 and length.total_seconds() == 5


def test_values_that_need_escaping_are_stored_exactly(
    settings_each_mode: Settings, redis_conn: redis.Redis, db
) -> None:
    """Tabs, newlines, backslashes, quotes and non-ASCII text in a payload or a text column reach
    PostgreSQL unchanged, and every time keeps its microseconds."""
    odd = 'tab\there\nnew "quoted" back\\slash é ✓ \\N'
    trade = orjson.loads(split_envelope(factories.agg_trade(1)).frame)  # type: ignore[union-attr]
    trade["data"]["x"] = odd
    received_us = 1_764_000_000_123_457
    redis_conn.rpush(keys.queue("agg_trades"), make_envelope("spot", received_us, orjson.dumps(trade)))
    record = {"started_at_us": 1_764_000_000_000_001, "stream": odd, "cause": "idle", "connection": odd}
    redis_conn.rpush(keys.queue("stream_gaps"), make_envelope("spot", received_us, orjson.dumps(record)))
    _drain(settings_each_mode, redis_conn)
    _drain(settings_each_mode, redis_conn, "stream_gaps")
    with db.cursor() as cur:
        cur.execute(
            "SELECT payload->>'x', (extract(epoch FROM received_at) * 1000000)::bigint,"
            " (extract(epoch FROM trade_time) * 1000)::bigint FROM agg_trades"
        )
        assert cur.fetchall() == [(odd, received_us, factories.BASE_MS)]
        cur.execute(
            "SELECT stream, connection, (extract(epoch FROM started_at) * 1000000)::bigint FROM stream_gaps"
        )
        assert cur.fetchall() == [(odd, odd, 1_764_000_000_000_001)]


def test_time_postgres_cannot_hold_is_a_dead_letter(settings: Settings, redis_conn: redis.Redis) -> None:
    """An event time past year 9999 dead-letters its envelope; the rest of the batch is stored."""
    init_db(settings)
    far = factories.agg_trade(2).replace(
        f'"E":{factories.BASE_MS + 2}'.encode(), f'"E":{10**15}'.encode()
    )  # about year 33658
    redis_conn.rpush(keys.queue("agg_trades"), factories.agg_trade(1), far, factories.agg_trade(3))
    result = Drainer(settings, redis_conn, lambda: connect(settings)).drain("agg_trades")
    assert (result.inserted, result.dead_letters) == (2, 1)
    letter = orjson.loads(redis_conn.lindex(keys.DEADLETTER, 0))
    assert "time out of range" in letter["reason"]


def test_timestamp_literals() -> None:
    """µs since the epoch become UTC `timestamptz` literals to the µs; past year 9999, FrameError."""
    assert timestamp(0) == "1970-01-01 00:00:00.000000+00"
    assert timestamp(1_764_000_000_123_457) == "2025-11-24 16:00:00.123457+00"
    assert timestamp(253_402_300_799_999_999) == "9999-12-31 23:59:59.999999+00"
    with pytest.raises(FrameError, match="time out of range"):
        timestamp(253_402_300_800_000_000)


def test_interleaved_runs_are_written_as_one_part_each(settings: Settings, redis_conn: redis.Redis) -> None:
    """Two stream processes feeding one queue interleave their envelopes: a batch is written as one
    part per run (not one per change of run), and each run is credited with exactly its own rows."""
    init_db(settings)
    one = [_tagged(factories.agg_trade(i), "r1", i + 1) for i in range(40)]
    two = [_tagged(factories.agg_trade(i, symbol="ETHUSDT"), "r2", i + 1) for i in range(40)]
    mixed = [envelope for pair in zip(one, two, strict=True) for envelope in pair]
    assert split_by_run(mixed) == [one, two]
    redis_conn.rpush(keys.queue("agg_trades"), *mixed)
    result = Drainer(settings, redis_conn, lambda: connect(settings)).drain("agg_trades")
    assert (result.batches, result.inserted) == (1, 80)
    balances = _balances(settings)
    assert [(b.drained, b.rows_inserted, b.highest) for b in (balances["r1"], balances["r2"])] == [
        (40, 40, 40),
        (40, 40, 40),
    ]


def test_range_check_reads_a_few_ranges_however_long_the_run(settings: Settings) -> None:
    """Checking a batch's numbers against `ingest_ranges` probes the neighbouring ranges only: a run
    of 20,000 drained batches is not read again for each new one (it was, which grew without end)."""
    init_db(settings)
    conn = connect(settings)
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO ingest_ranges (table_name, run, first_seq, last_seq, first_received_at,"
            " last_received_at) SELECT 'agg_trades', 'r1', 10 * i + 1, 10 * i + 10, now(), now()"
            " FROM generate_series(0, 19999) AS i"
        )
        cur.execute("ANALYZE ingest_ranges")
        conn.commit()
        batch = [SeqRange("r1", 200_001, 200_010, 1, 2)]
        assert check_ranges(cur, "agg_trades", batch) is False
        assert check_ranges(cur, "agg_trades", [SeqRange("r1", 199_995, 200_004, 1, 2)]) is True
        cur.execute(
            "SELECT pg_stat_get_xact_tuples_fetched('ingest_ranges'::regclass)"
            " + pg_stat_get_xact_tuples_returned('ingest_ranges'::regclass)"
        )
        read = cur.fetchone()[0]
    conn.close()
    assert read <= 10, read
