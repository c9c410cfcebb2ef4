"""The drain: Redis queue -> PostgreSQL, exactly once, with dead letters and in-flight recovery."""

from __future__ import annotations

from pathlib import Path

import orjson
import psycopg2
import pytest
import redis

from collector.db.connection import connect, ensure_database
from collector.db.init import init_db
from collector.drain import Drainer
from collector.local.servers import LocalService, start_postgres
from collector.queue import keys
from collector.queue.batches import BatchQueue, inflight_length
from collector.settings import Settings, load_settings
from tests import factories


def _drainer(settings: Settings, client: redis.Redis) -> Drainer:
    return Drainer(settings, client, lambda: connect(settings))


def _count(conn: psycopg2.extensions.connection, table: str) -> int:
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return int(cur.fetchone()[0])


def test_every_table_gets_typed_rows(settings: Settings, redis_conn: redis.Redis, db) -> None:
    """Each kind of envelope becomes a row with its typed columns, its payload and its receive time."""
    redis_conn.rpush(keys.queue("agg_trades"), factories.agg_trade(1), factories.agg_trade(2, market="spot"))
    redis_conn.rpush(
        keys.queue("depth_updates"), factories.depth_update(1), factories.depth_update(2, market="spot")
    )
    redis_conn.rpush(keys.queue("mark_prices"), factories.mark_price_frame(1))
    redis_conn.rpush(keys.queue("force_orders"), factories.force_order(1))
    redis_conn.rpush(keys.queue("open_interest"), factories.open_interest(1))
    redis_conn.rpush(
        keys.queue("depth_snapshots"), factories.depth_snapshot(1), factories.depth_snapshot(2, "futures")
    )
    drainer = _drainer(settings, redis_conn)
    for table in keys.TABLES:
        drainer.drain(table)
    with db.cursor() as cur:
        cur.execute(
            "SELECT market, symbol, aggregate_trade_id, price::text, quantity::text, is_buyer_maker,"
            " extract(epoch from trade_time)*1000, payload->>'e' FROM agg_trades ORDER BY market"
        )
        assert cur.fetchall() == [
            ("futures", "BTCUSDT", 1_000_001, "65001.10", "0.015", False, factories.BASE_MS, "aggTrade"),
            ("spot", "BTCUSDT", 1_000_002, "65002.10", "0.015", True, factories.BASE_MS + 1, "aggTrade"),
        ]
        cur.execute(
            "SELECT market, first_update_id, final_update_id, previous_final_update_id,"
            " transaction_time IS NULL FROM depth_updates ORDER BY market"
        )
        assert cur.fetchall() == [("futures", 11, 20, 10, False), ("spot", 21, 30, None, True)]
        cur.execute("SELECT symbol, mark_price::text, funding_rate::text FROM mark_prices ORDER BY symbol")
        assert cur.fetchall() == [("BTCUSDT", "65000.5", "0.00010000"), ("ETHUSDT", "65000.5", "0.00010000")]
        cur.execute("SELECT symbol, side, quantity::text, price::text, order_status FROM force_orders")
        assert cur.fetchall() == [("BTCUSDT", "SELL", "0.5", "65000.0", "FILLED")]
        cur.execute("SELECT symbol, open_interest::text, exchange_time IS NOT NULL FROM open_interest")
        assert cur.fetchall() == [("BTCUSDT", "10001.509", True)]
        cur.execute(
            "SELECT market_type, last_update_id, event_time IS NULL FROM depth_snapshots ORDER BY market_type"
        )
        assert cur.fetchall() == [("futures", 2000, False), ("spot", 1000, True)]
        cur.execute("SELECT extract(epoch from received_at)*1000000 FROM agg_trades WHERE market='futures'")
        assert cur.fetchone()[0] == (factories.BASE_MS + 1) * 1000 + 7
    assert all(
        redis_conn.llen(keys.queue(t)) == 0 and inflight_length(redis_conn, t) == 0 for t in keys.TABLES
    )


def test_same_batch_twice_inserts_once(settings: Settings, redis_conn: redis.Redis, db) -> None:
    """A batch delivered twice (and duplicates inside one batch) is stored exactly once."""
    batch = [factories.agg_trade(i) for i in range(300)]
    redis_conn.rpush(keys.queue("agg_trades"), *batch, *batch[:50])
    first = _drainer(settings, redis_conn).drain("agg_trades")
    redis_conn.rpush(keys.queue("agg_trades"), *batch)
    second = _drainer(settings, redis_conn).drain("agg_trades")
    assert _count(db, "agg_trades") == 300
    assert (first.inserted, first.duplicates) == (300, 50)
    assert (second.inserted, second.duplicates) == (0, 300)
    assert int(redis_conn.hget(keys.metric("rows_inserted"), "agg_trades")) == 300


def test_backlog_drains_in_repeated_batches(settings: Settings, redis_conn: redis.Redis, db) -> None:
    """A backlog larger than one batch is drained completely within one run, in order-sized batches."""
    settings = load_settings(drain_batch_max_rows=1000)
    events = [factories.depth_update(i) for i in range(4500)]
    redis_conn.rpush(keys.queue("depth_updates"), *events)
    result = _drainer(settings, redis_conn).drain("depth_updates")
    assert (result.batches, result.inserted, result.remaining) == (5, 4500, 0)
    assert _count(db, "depth_updates") == 4500


def test_malformed_envelopes_go_to_dead_letters(settings: Settings, redis_conn: redis.Redis, db) -> None:
    """Unparsable or incomplete envelopes become dead letters with a reason; the rest is stored."""
    bad_json = b"{not json"
    missing_field = factories.agg_trade(2).replace(b'"a":1000002', b'"a":"x"')
    bad_price = factories.agg_trade(3).replace(b'"p":"65003.10"', b'"p":"abc"')
    redis_conn.rpush(keys.queue("agg_trades"), factories.agg_trade(1), bad_json, missing_field, bad_price)
    result = _drainer(settings, redis_conn).drain("agg_trades")
    assert (result.inserted, result.dead_letters) == (1, 3)
    letters = [orjson.loads(x) for x in redis_conn.lrange(keys.DEADLETTER, 0, -1)]
    assert [x["source"] for x in letters] == ["drain"] * 3
    # An envelope whose head is unreadable is kept whole; a readable one gives its frame and head.
    assert letters[0]["frame"] == "{not json" and "not JSON" in letters[0]["reason"]
    assert letters[0]["market"] is None and letters[1]["market"] == "futures"
    assert letters[1]["frame"].encode() in missing_field and letters[1]["table"] == "agg_trades"
    assert "'a'" in letters[1]["reason"] and "'p'" in letters[2]["reason"]
    assert inflight_length(redis_conn, "agg_trades") == 0


def test_value_postgres_rejects_is_isolated(settings: Settings, redis_conn: redis.Redis, db) -> None:
    """A payload PostgreSQL refuses (JSONB has no \\u0000) dead-letters that envelope only."""
    poisoned = factories.force_order(2).replace(b'"o":"LIMIT"', b'"o":"LIM\\u0000IT"')
    redis_conn.rpush(keys.queue("force_orders"), factories.force_order(1), poisoned, factories.force_order(3))
    result = _drainer(settings, redis_conn).drain("force_orders")
    assert (result.inserted, result.dead_letters) == (2, 1)
    letter = orjson.loads(redis_conn.lindex(keys.DEADLETTER, 0))
    assert "rejected by PostgreSQL" in letter["reason"]
    assert _count(db, "force_orders") == 2


def test_coin_m_rows_are_left_out_unless_kept(settings: Settings, redis_conn: redis.Redis, db) -> None:
    """All-market rows with st != 1 are skipped by default; rows without st (old format) are kept."""
    redis_conn.rpush(keys.queue("mark_prices"), factories.mark_price_frame(1, coin_m=("BTCUSD_PERP",)))
    redis_conn.rpush(
        keys.queue("force_orders"), factories.force_order(1, st=2), factories.force_order(2, st=None)
    )
    drainer = _drainer(settings, redis_conn)
    assert drainer.drain("mark_prices").filtered == 1  # `collector audit`'s FILTERED, and the summary's
    assert drainer.drain("force_orders").filtered == 1
    assert _count(db, "mark_prices") == 2 and _count(db, "force_orders") == 1
    assert int(redis_conn.hget(keys.metric("coin_m_skipped"), "mark_prices")) == 1
    keep = load_settings(keep_coin_m_rows=True)
    redis_conn.rpush(keys.queue("force_orders"), factories.force_order(1, st=2))
    _drainer(keep, redis_conn).drain("force_orders")
    assert _count(db, "force_orders") == 2


def test_batch_left_in_flight_is_written_by_next_drain(
    settings: Settings, redis_conn: redis.Redis, db
) -> None:
    """A batch claimed by a drain that died before acknowledging is written by the next one, once."""
    redis_conn.rpush(keys.queue("agg_trades"), *[factories.agg_trade(i) for i in range(100)])
    queue = BatchQueue(redis_conn, "agg_trades")
    first, second = queue.claim(30), queue.claim(30)  # the "dead" drain took two batches and vanished
    assert first and second and inflight_length(redis_conn, "agg_trades") == 60
    result = _drainer(settings, redis_conn).drain("agg_trades")
    assert result.inserted == 100 and _count(db, "agg_trades") == 100
    assert inflight_length(redis_conn, "agg_trades") == 0
    assert not redis_conn.exists(first.key, second.key, keys.inflight("agg_trades"))


def test_two_drains_of_one_table_never_overlap(settings: Settings, redis_conn: redis.Redis, db) -> None:
    """While one drain holds a table's lock, another returns at once without touching the queue."""
    redis_conn.rpush(keys.queue("agg_trades"), factories.agg_trade(1))
    holder = redis_conn.lock(keys.drain_lock("agg_trades"), timeout=30)
    assert holder.acquire(blocking=False)
    result = _drainer(settings, redis_conn).drain("agg_trades")
    assert result.lock_busy and redis_conn.llen(keys.queue("agg_trades")) == 1
    holder.release()
    assert _drainer(settings, redis_conn).drain("agg_trades").inserted == 1


def test_postgres_down_keeps_batch_until_it_returns(
    settings: Settings, redis_conn: redis.Redis, services_dir: Path, tmp_path: Path
) -> None:
    """With PostgreSQL refusing connections nothing leaves Redis; once it is back all rows land once."""
    server: LocalService = start_postgres(tmp_path / "pg-flaky", durable=False)
    try:
        own = load_settings(database_url=server.url)
        init_db(own)
        redis_conn.rpush(keys.queue("agg_trades"), *[factories.agg_trade(i) for i in range(50)])
        drainer = _drainer(own, redis_conn)
        drainer.drain("agg_trades")
        assert _count(connect(own, autocommit=True), "agg_trades") == 50
        server.stop()
        redis_conn.rpush(keys.queue("agg_trades"), *[factories.agg_trade(i) for i in range(50, 120)])
        with pytest.raises(Exception, match="unreachable"):
            drainer.drain("agg_trades")
        assert redis_conn.llen(keys.queue("agg_trades")) == 70
        server = start_postgres(tmp_path / "pg-flaky", port=server.port, durable=False)
        drainer.drain("agg_trades")
        assert _count(connect(own, autocommit=True), "agg_trades") == 120
    finally:
        server.stop()


def test_drain_summary_is_one_info_line_a_minute_with_every_process_totals(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs of one table in three worker processes add up to one INFO summary a minute with their totals
    (filtered rows included, as `collector audit` counts them); dead letters are reported at once."""
    from collector.drain import DrainResult, log_summary
    from collector.queue.drain_summary import DrainSummaries

    clients = [redis.Redis.from_url(redis_url) for _ in range(3)]  # one per pool process
    processes = [DrainSummaries(client) for client in clients]

    def run(envelopes: int, dead: int = 0, filtered: int = 0) -> DrainResult:
        return DrainResult(
            "agg_trades",
            batches=1,
            envelopes=envelopes,
            inserted=envelopes - dead - filtered,
            filtered=filtered,
            dead_letters=dead,
        )

    start_us = 1_700_000_000_000_000
    try:
        with caplog.at_level("DEBUG", logger="collector.drain"):
            for second in range(61):
                filtered = 2 if second % 2 else 0  # 30 of the 61 runs left two rows out
                log_summary(
                    processes[second % 3],
                    run(10, filtered=filtered),
                    start_us + second * 1_000_000,
                    notable=False,
                )
            log_summary(processes[1], run(5, dead=1), start_us + 61_500_000, notable=True)
            log_summary(processes[2], run(7), start_us + 62_000_000, notable=False)
    finally:
        for client in clients:
            client.close()
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert infos == [
        "drain.summary table=agg_trades over_s=60 runs=61 envelopes=610 inserted=550 duplicates=0 "
        "filtered=60 dead_letters=0 remaining=0 (all worker processes)",
        "drain.summary table=agg_trades over_s=2 runs=1 envelopes=5 inserted=4 duplicates=0 "
        "filtered=0 dead_letters=1 remaining=0 (all worker processes)",
    ]
    assert "drain.run table=agg_trades envelopes=7" in caplog.text  # the next summary's first run


def test_drain_task_waits_out_transient_failures_and_raises_permanent_ones(
    settings: Settings,
    redis_conn: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL unreachable (transient): one warning for many runs and the batch kept. A missing table
    (permanent): the task raises, and once the schema exists the next run stores everything."""
    from collector.local.servers import free_port
    from collector.settings import get_settings
    from collector.tasks import ingest

    for name, value in (("_conn", None), ("_redis", None), ("_postgres_states", {}), ("_redis_states", {})):
        monkeypatch.setattr(ingest, name, value)
    redis_conn.rpush(keys.queue("agg_trades"), *[factories.agg_trade(i) for i in range(10)])
    good = settings.database_url
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/collector")
    get_settings.cache_clear()
    with caplog.at_level("INFO"):
        for _ in range(3):
            ingest.drain("agg_trades")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("collector.tasks.ingest")]
    assert [line.split(" ")[0] for line in lines] == ["drain.agg_trades.postgres_unreachable"]
    assert redis_conn.llen(keys.queue("agg_trades")) == 10

    monkeypatch.setenv("DATABASE_URL", good)
    get_settings.cache_clear()
    ensure_database(load_settings())  # the database exists, its tables do not (no init-db yet)
    with pytest.raises(psycopg2.errors.UndefinedTable):
        ingest.drain("agg_trades")
    assert inflight_length(redis_conn, "agg_trades") == 10  # claimed, not lost: the next drain recovers it
    init_db(load_settings())
    ingest.drain("agg_trades")
    assert _count(connect(load_settings(), autocommit=True), "agg_trades") == 10
    ingest._forget_connection()
    get_settings.cache_clear()
