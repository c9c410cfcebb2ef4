"""Stream process throughput: fake exchange at full speed -> `collector streams` -> Redis, beside its limits.

Run: `.venv/bin/python bench/stream_throughput.py [--seconds 15]`. It starts its own redis-server and
fake exchange (`collector fake-exchange --rate 0`, a separate process), then measures in turn:

1. the fake's raw send rate into a minimal client that discards every frame (same connections);
2. the stream process (`collector streams`, a real subprocess): events/s stored in Redis (LLEN)
   and its CPU% (utime+stime from /proc/<pid>/stat over wall time; 100% = one core);
3. Redis's pipelined RPUSH rate of the same envelopes from one Python process (MULTI/EXEC
   pipelines of STREAM_FLUSH_MAX_EVENTS, as the sink sends them).

`--tls` runs the same over wss:// (the fake's `--tls`: a CA made at start, trusted through
SSL_CERT_FILE); `--loop asyncio|uvloop` picks the stream process's event loop (STREAM_UVLOOP). Each run
also reports CPU µs per event and the stream process's longest event-loop block (`keys.STREAMS_LOOP`).

The issue's floor is 30,000 events/s into Redis; the exit code is 1 below it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import redis
import redis.asyncio
from fakeload import raw_client_rate  # bench/fakeload.py, beside this script
from processes import cpu_percent, cpu_sample, stop

from collector.binance.streams import connection_plans
from collector.fake.tls import CA_FILE_NAME
from collector.local.servers import LocalService, free_port, start_redis, wait_for_port
from collector.queue import keys
from collector.queue.loop_lag import read_loop_lag
from collector.queue.shards import present_lanes
from collector.settings import load_settings

FLOOR_EVENTS_PER_S = 30_000
TABLES = ("agg_trades", "depth_updates", "mark_prices", "force_orders")
BIN = Path(sys.executable).parent


def queued(client: redis.Redis) -> dict[str, int]:
    """Envelopes waiting per table, summed over its queue shards (QUEUE_SHARDS)."""
    counts = dict.fromkeys(TABLES, 0)
    for table, shard in present_lanes(client, TABLES, 1):
        counts[table] += int(client.llen(keys.queue(table, shard)))
    return counts


async def redis_rpush_rate(url: str, envelopes: list[bytes], batch: int, seconds: float) -> float:
    """Envelopes/s one Python process pushes with MULTI/EXEC pipelines of `batch` RPUSH values."""
    client = redis.asyncio.Redis.from_url(url)
    scratch = "bench:rpush"
    pushed = 0
    index = 0
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            values = envelopes[index : index + batch]
            index = (index + batch) % max(1, len(envelopes) - batch)
            pipe = client.pipeline(transaction=True)
            pipe.rpush(scratch, *values)
            pipe.hincrby("bench:stats", "pushed", len(values))
            await pipe.execute()
            pushed += len(values)
            if pushed % (batch * 100) < batch:
                await client.delete(scratch)
        return pushed / (time.monotonic() - start)
    finally:
        await client.delete(scratch)
        await client.aclose()


def start_fake(port: int, log: Path, tls_dir: Path | None = None, rate: float = 0) -> subprocess.Popen[bytes]:
    args = [str(BIN / "collector"), "fake-exchange", "--rate", f"{rate:g}", "--port", str(port)]
    if tls_dir is not None:
        args += ["--tls", "--tls-dir", str(tls_dir)]
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_for_port(port)
    return process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured run of the stream process")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--tls", action="store_true", help="wss:// from a fake serving TLS")
    parser.add_argument(
        "--rate", type=float, default=0, help="the fake's events/s per connection; 0 (default) = full speed"
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="STREAM_UVLOOP")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    redis_server: LocalService | None = None
    fake: subprocess.Popen[bytes] | None = None
    try:
        redis_server = start_redis(workdir / "redis")
        port = free_port()
        tls_dir = workdir / "tls" if args.tls else None
        fake = start_fake(port, workdir / "fake.log", tls_dir, args.rate)
        scheme = "wss" if args.tls else "ws"
        env = {
            **os.environ,
            "REDIS_URL": redis_server.url,
            "BINANCE_SPOT_WS_URL": f"{scheme}://127.0.0.1:{port}/spot",
            "BINANCE_FUTURES_WS_URL": f"{scheme}://127.0.0.1:{port}/futures",
            "STREAM_UVLOOP": "true" if args.loop == "uvloop" else "false",
            # Nothing drains here: without a cap this high the queues pass REDIS_MAX_QUEUE_BYTES within
            # seconds and the process measured would be spilling to disk, not pushing into Redis.
            "REDIS_MAX_QUEUE_BYTES": os.environ.get("REDIS_MAX_QUEUE_BYTES", str(64 << 30)),
        }
        context = None
        if tls_dir is not None:
            ca_file = tls_dir / CA_FILE_NAME
            env |= {"SSL_CERT_FILE": str(ca_file), "REQUESTS_CA_BUNDLE": str(ca_file)}
            context = ssl.create_default_context(cafile=str(ca_file))
        os.chdir(workdir)  # no stray .env
        settings = load_settings(
            redis_url=env["REDIS_URL"],
            binance_spot_ws_url=env["BINANCE_SPOT_WS_URL"],
            binance_futures_ws_url=env["BINANCE_FUTURES_WS_URL"],
        )
        plans = connection_plans(settings)
        assert redis_server.process is not None
        redis_pid = redis_server.process.pid
        client = redis.Redis.from_url(redis_server.url)

        raw_fps, raw_mbps, raw_cpu = asyncio.run(raw_client_rate([p.url for p in plans], 5.0, context))

        with (workdir / "streams.log").open("wb") as log:
            streams = subprocess.Popen(
                [str(BIN / "collector"), "streams"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
            time.sleep(args.warmup)
            before, cpu_before = queued(client), cpu_sample(streams.pid)
            fake_before, redis_before = cpu_sample(fake.pid), cpu_sample(redis_pid)
            time.sleep(args.seconds)
            after, cpu_after = queued(client), cpu_sample(streams.pid)
            fake_after, redis_after = cpu_sample(fake.pid), cpu_sample(redis_pid)
            lag = read_loop_lag(client)
            code = stop(streams)
        elapsed = cpu_after.wall - cpu_before.wall
        per_table = {table: (after[table] - before[table]) / elapsed for table in TABLES}
        stored_rate = sum(per_table.values())
        stats_total = sum(int(v) for v in client.hgetall(keys.STREAM_MESSAGES).values())
        final_total = sum(queued(client).values())

        sample: list[bytes] = []
        for table in TABLES:
            sample += cast(list[bytes], client.lrange(keys.queue(table), 0, 4999))
        sample_bytes = sum(map(len, sample)) / max(1, len(sample))
        rpush_rate = asyncio.run(
            redis_rpush_rate(redis_server.url, sample, settings.stream_flush_max_events, 3.0)
        )

        transport = "wss:// (TLS)" if args.tls else "ws://"
        print(
            f"stream process throughput over {transport} on {args.loop} "
            f"({elapsed:.1f} s measured after {args.warmup:.0f} s warm-up)"
        )
        print(f"  stored into Redis        {stored_rate:12,.0f} events/s")
        for table, rate in per_table.items():
            print(f"    {table:<22} {rate:12,.0f} events/s")
        stream_cpu = cpu_percent(cpu_before, cpu_after)
        print(f"  stream process CPU       {stream_cpu:12.0f} % of one core")
        print(f"  CPU per event            {stream_cpu / 100 * 1e6 / max(stored_rate, 1):12.1f} µs")
        if lag is not None:
            print(
                f"  longest loop block       {lag.max_block_ms:12.1f} ms   "
                f"(own work {lag.max_cpu_ms:.1f} ms, {lag.blocks_over} over {lag.block_warn_ms:g} ms)"
            )
        print(f"  fake exchange CPU        {cpu_percent(fake_before, fake_after):12.0f} %")
        print(f"  redis-server CPU         {cpu_percent(redis_before, redis_after):12.0f} %")
        print(f"  exit code on SIGTERM     {code:12d}   (stats hash {stats_total:,} = lists {final_total:,})")
        print("this machine's limits, same run")
        print(
            f"  fake -> discarding client{raw_fps:12,.0f} frames/s "
            f"({raw_mbps:.0f} MB/s, client CPU {raw_cpu:.0f} %)"
        )
        print(
            f"  Redis pipelined RPUSH    {rpush_rate:12,.0f} envelopes/s "
            f"(one process, {sample_bytes:.0f} B each)"
        )
        if args.rate:  # a set rate below the floor measures cost, not capacity
            return 0 if code == 0 else 1
        verdict = "meets" if stored_rate >= FLOOR_EVENTS_PER_S else "BELOW"
        print(f"floor {FLOOR_EVENTS_PER_S:,} events/s: {verdict}")
        return 0 if stored_rate >= FLOOR_EVENTS_PER_S and code == 0 else 1
    finally:
        if fake is not None:
            stop(fake)
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
