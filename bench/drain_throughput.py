"""Drain benchmark: N queued aggTrade envelopes -> PostgreSQL, beside a plain COPY of the same rows.

    .venv/bin/python bench/drain_throughput.py [--events 500000] [--batch 5000]

Starts its own Redis and PostgreSQL (durable settings, as in production), queues N distinct
envelopes, drains them with the real `Drainer`, and prints rows/s. The machine's own limit is
measured in the same run: the same rows COPYed straight into an unindexed table (no parsing, no
dedup), i.e. the fastest PostgreSQL here can take them.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.db.connection import connect
from collector.db.init import init_db
from collector.drain import Drainer, build_rows
from collector.fake.envelopes import agg_trade
from collector.local.servers import start_postgres, start_redis
from collector.queue import keys
from collector.settings import load_settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="collector-bench-"))
    workdir.chmod(0o755)
    redis_server = start_redis(workdir / "redis")
    pg = start_postgres(workdir / "pg", durable=True)
    try:
        settings = load_settings(
            redis_url=redis_server.url,
            database_url=pg.url,
            drain_batch_max_rows=args.batch,
            drain_run_max_s=3600,
        )
        init_db(settings)
        client = redis.Redis.from_url(settings.redis_url)
        envelopes = [agg_trade(i) for i in range(args.events)]
        for start in range(0, len(envelopes), 10_000):
            client.rpush(keys.queue("agg_trades"), *envelopes[start : start + 10_000])

        started = time.perf_counter()
        cpu_started = time.process_time()
        result = Drainer(settings, client, lambda: connect(settings)).drain("agg_trades")
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        assert result.inserted == args.events, result

        # The limit: the same rows, already rendered, COPYed into a bare table (no index, no parsing).
        buffer = build_rows("agg_trades", envelopes, keep_coin_m=False).rendered
        conn = connect(settings)
        with conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE plain_copy (event_time timestamptz, market text, symbol text, a bigint,"
                " trade_time timestamptz, price numeric, quantity numeric, f bigint, l bigint,"
                " m boolean, received_at timestamptz, payload jsonb)"
            )
            conn.commit()
            copy_started = time.perf_counter()
            cur.copy_expert("COPY plain_copy FROM STDIN", io.BytesIO(buffer))
            conn.commit()
            copy_elapsed = time.perf_counter() - copy_started
        conn.close()

        print(
            f"drain: {args.events} events in {elapsed:.2f} s = {args.events / elapsed:,.0f} rows/s "
            f"(batch {args.batch}, {result.batches} batches, drain process CPU {cpu / elapsed:.0%})"
        )
        print(
            f"limit: plain COPY of the same rows = {args.events / copy_elapsed:,.0f} rows/s "
            f"({copy_elapsed:.2f} s; no parsing, no unique index, no dedup)"
        )
        print(f"ratio: drain / plain COPY = {copy_elapsed / elapsed:.0%}")
        return 0
    finally:
        pg.stop()
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
