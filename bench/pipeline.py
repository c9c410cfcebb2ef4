"""Pipeline benchmark: fake exchange -> `collector streams` -> Redis -> Celery -> PostgreSQL, several rates.

    .venv/bin/python bench/pipeline.py [--rates 10000,20000,50000] [--duration 30] [--profile 20]
    make bench-pipeline

Starts its own Redis, a durable PostgreSQL (TimescaleDB preloaded when installed; fsync on, server
defaults) and the project's fake exchange offering aggTrades of every symbol it lists (100 made-up
ones per market besides its own), at an exact total rate shared by the connections; then the
collector as `make run` starts it: `collector init-db`, and the Procfile's streams, worker-ingest,
worker-rest and beat (REST polls hourly; only aggTrade streams). Each rate runs for --duration
seconds after a warm-up; then the load drops to --idle-rate until the backlog has drained. After the
given rates it steps up (--step) from the highest that held, to find the highest sustained rate.

Reported per rate, as tables and as JSON (stdout and var/bench/pipeline-<time>.json): offered and
stored msg/s, the Redis backlog (max, and whether it drained), event -> committed-row latency
(pipeline_db.py says how), CPU s per 100k messages per process group (every process of its tree,
exited ones included) and the collector's µs per message. Then, once: peak RSS per process, Redis
bytes per queued envelope, bytes per stored row per table (compressed too with TimescaleDB),
stored == offered over the whole run, and this machine's own limits: a plain COPY of the same rows
into an unindexed table, and the fake's rate to a client that discards every frame.

To measure another version of the collector: PYTHONPATH=/path/to/its/checkout (the fake and this
script stay this checkout's).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2
import redis
from fakeload import ROOT, raw_client_rate, stream_urls
from pipeline_db import (
    compressed_bytes,
    count_rows,
    filled_tables,
    hypertables,
    plain_copy_rate,
    reset_statements,
    rows_of,
    settings,
    table_bytes,
    timescale_active,
    top_statements,
    window_rows,
)
from pipeline_report import (
    cpu_deltas,
    cpu_table,
    highest_sustained,
    next_search_rate,
    per_100k,
    rss_table,
    size_table,
    sustained,
    throughput_table,
    us_per_message,
)
from pipeline_stack import (
    BIN,
    READY_TIMEOUT_S,
    BacklogWatch,
    Stack,
    backlog,
    collector_root,
    start_stack,
    wait_for,
)

PER_CONNECTION = 200  # streams per connection of the discarding client (the collector's default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rates", default="10000,20000,50000", help="msg/s, comma separated")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds at each rate before measuring")
    parser.add_argument(
        "--symbols", type=int, default=100, help="made-up symbols per market (+ the fake's own)"
    )
    parser.add_argument("--step", type=float, default=10_000, help="msg/s between rates when searching")
    parser.add_argument("--search-steps", type=int, default=3, help="most rates tried beyond --rates")
    parser.add_argument("--idle-rate", type=float, default=500.0, help="msg/s between rates, while draining")
    parser.add_argument(
        "--drain-stall", type=float, default=60.0, help="seconds without the backlog shrinking: not draining"
    )
    parser.add_argument(
        "--limit-seconds", type=float, default=5.0, help="the discarding client's measurement"
    )
    parser.add_argument(
        "--probe-envelopes", type=int, default=50_000, help="queued for Redis's bytes/envelope"
    )
    parser.add_argument("--copy-rows", type=int, default=200_000, help="rows of the plain COPY limit")
    parser.add_argument("--profile", type=float, default=0.0, help="seconds of py-spy + pg_stat_statements")
    parser.add_argument("--profile-rate", type=float, default=20_000.0)
    parser.add_argument("--profile-format", choices=("speedscope", "flamegraph"), default="speedscope")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "var" / "bench", help="folder of the JSON and profiles"
    )
    return parser.parse_args(argv)


def discarding_limit(stack: Stack, seconds: float) -> dict[str, float]:
    """The fake at full speed into a client that discards every frame, on the collector's streams."""
    urls = []
    for market in ("spot", "futures"):
        names = [f"{symbol.lower()}@aggTrade" for symbol in stack.control.trading_symbols(market)]
        path = (
            "spot" if market == "spot" else "futures/market"
        )  # USD-M trades: market streams (binance.md §2)
        urls += stream_urls(f"ws://127.0.0.1:{stack.fake_port}/{path}", names, PER_CONNECTION)
    frames, mb, cpu = asyncio.run(raw_client_rate(urls, seconds))
    return {"frames_per_s": frames, "mb_per_s": mb, "client_cpu_percent": cpu, "connections": len(urls)}


def wait_drained(stack: Stack, client: redis.Redis, stall_s: float) -> tuple[bool, float]:
    """Until the backlog is back to a couple of seconds of the idle rate, however long that takes
    while it shrinks, so that the next rate starts clean; (drained, seconds it took): not drained
    when it stopped shrinking for `stall_s`. Reads Redis only: no work of ours on the measured servers."""
    started = time.monotonic()
    best, progressed = backlog(client), started
    while best > stack.idle_bound:
        time.sleep(0.5)
        queued = backlog(client)
        if queued < best:
            best, progressed = queued, time.monotonic()
        elif time.monotonic() - progressed > stall_s:
            return False, time.monotonic() - started
    return True, time.monotonic() - started


def wait_rows_settled(conn: Any, t0: float, t1: float) -> None:
    """Until the rows of the window stop changing (its last batches committed), for up to a minute."""
    last, deadline = -1, time.monotonic() + 60
    while (now := rows_of(conn, t0, t1)) != last and time.monotonic() < deadline:
        last = now
        time.sleep(1.0)


def wait_emptied(client: redis.Redis, stall_s: float) -> None:
    """Until the backlog is empty, however long that takes while it keeps shrinking; TimeoutError
    once it has not shrunk for `stall_s`."""
    best, progressed = backlog(client), time.monotonic()
    while best > 0:
        time.sleep(1.0)
        now = backlog(client)
        if now < best:
            best, progressed = now, time.monotonic()
        elif time.monotonic() - progressed > stall_s:
            raise TimeoutError(f"pipeline bench: the backlog stayed at {now:,} for {stall_s:.0f} s")


def run_step(
    stack: Stack, watch: BacklogWatch, conn: Any, rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    stack.control.set_total_rate(rate)
    time.sleep(args.warmup)  # the load settles at the new rate before the window opens
    watch.take_max()
    sent0, cpu0, t0 = stack.control.frames_sent(), stack.cpu(), time.time()
    time.sleep(args.duration)
    sent1, t1 = stack.control.frames_sent(), time.time()
    backlog_max = watch.take_max()
    stack.control.set_total_rate(args.idle_rate)
    drained, drain_s = wait_drained(stack, watch.client, args.drain_stall)
    # CPU is counted until the backlog has drained, over every message offered meanwhile: the work
    # of a rate that did not hold is partly done after its window.
    sent2, cpu2 = stack.control.frames_sent(), stack.cpu()
    wait_rows_settled(conn, t0, t1)
    rows = window_rows(conn, t0, t1)
    offered = sent1 - sent0
    cpu_s = cpu_deltas(cpu0, cpu2)
    offered_rate, stored_rate = offered / (t1 - t0), rows.committed_in_window / (t1 - t0)
    step = {
        "target": rate,
        "window_s": round(t1 - t0, 2),
        "offered": offered,
        "offered_per_s": offered_rate,
        "stored_per_s": stored_rate,
        "rows_of_window": rows.of_window,
        "backlog_max": backlog_max,
        "backlog_max_s_of_input": backlog_max / rate,
        "drained": drained,
        "drain_s": drain_s,
        "latency_s": {"p50": rows.p50_s, "p99": rows.p99_s, "max": rows.max_s},
        "cpu_s": cpu_s,
        "cpu_messages": sent2 - sent0,
        "cpu_s_per_100k": per_100k(cpu_s, sent2 - sent0),
        "cpu_us_per_msg": us_per_message(cpu_s, sent2 - sent0),
        "sustained": sustained(rate, offered_rate, stored_rate, backlog_max, drained, t1 - t0),
    }
    print(
        f"rate {rate:,.0f}/s: offered {offered_rate:,.0f}, stored {stored_rate:,.0f}, backlog max "
        f"{backlog_max:,}, p99 {rows.p99_s}, drained {drained} -> sustained {step['sustained']}",
        file=sys.stderr,
        flush=True,
    )
    return step


def profile(stack: Stack, conn: Any, args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    """py-spy on the stream process and both workers (pool children included) while offering one rate,
    and PostgreSQL's statements by total time over the same seconds."""
    spy = BIN / "py-spy"
    if not spy.exists():
        subprocess.run([str(BIN / "pip"), "install", "--quiet", "py-spy"], check=True)
    stack.control.set_total_rate(args.profile_rate)
    time.sleep(args.warmup)
    reset_statements(conn)
    suffix = "json" if args.profile_format == "speedscope" else "svg"
    spies, files = [], {}
    for name in ("streams", "worker-ingest", "worker-rest"):
        out = args.out / f"pyspy-{stamp}-{name}.{suffix}"
        command = [str(spy), "record", "-p", str(stack.processes[name].pid), "-d", str(int(args.profile))]
        command += ["--nonblocking", "-f", args.profile_format, "-o", str(out)]
        if name.startswith("worker"):
            command.append("--subprocesses")
        spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        files[name] = str(out)
    for process in spies:
        process.wait(timeout=args.profile + 120)
    statements = top_statements(conn)
    stack.control.set_total_rate(args.idle_rate)
    return {
        "rate": args.profile_rate,
        "seconds": args.profile,
        "py_spy_files": files,
        "statements": statements,
    }


def redis_probe(stack: Stack, client: redis.Redis, rate: float, envelopes: int) -> dict[str, Any]:
    """Bytes Redis holds per queued envelope: the workers stopped, the stream process queues at `rate`."""
    before_memory, before_queued = int(client.info("memory")["used_memory"]), backlog(client)
    stack.control.resume()
    stack.control.set_total_rate(rate)
    wait_for(lambda: backlog(client) - before_queued >= envelopes, 120, "backlog to probe", 0.2)
    stack.control.pause()
    queued = backlog(client) - before_queued
    used = int(client.info("memory")["used_memory"]) - before_memory
    lists = [key for key in client.scan_iter(match="collector:queue:*") if client.type(key) == b"list"]
    biggest = max(lists, key=lambda key: int(client.llen(key)))
    sample = client.lrange(biggest, 0, 999)
    return {
        "queued": queued,
        "used_memory_delta_per_envelope": used / queued,
        "memory_usage_per_envelope": int(client.memory_usage(biggest, samples=0) or 0)
        / int(client.llen(biggest)),
        "mean_envelope_bytes": sum(map(len, sample)) / max(1, len(sample)),
    }


def sizes(conn: Any, timescale: bool) -> dict[str, dict[str, Any]]:
    """Bytes per stored row of every filled table; with TimescaleDB, compressed as well (all chunks)."""
    tables = filled_tables(conn)
    hyper = hypertables(conn) if timescale else {}
    found: dict[str, dict[str, Any]] = {}
    for table, rows in tables.items():
        found[table] = {"rows": rows, "bytes_per_row": table_bytes(conn, table, table in hyper) / rows}
    for table in found:
        if hyper.get(table):
            before, after = compressed_bytes(conn, table)
            found[table]["compressed_bytes_per_row"] = after / found[table]["rows"]
            found[table]["compression_ratio"] = before / after if after else None
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a test's timeout, `kill`) ends the run through the finally below, servers stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    workdir.chmod(0o755)
    report: dict[str, Any] = {"started": stamp, "collector": str(collector_root()), "cores": os.cpu_count()}
    report["load_average_before"] = os.getloadavg()[0]
    stack = start_stack(workdir, args.symbols, statements=args.profile > 0)
    stack.idle_bound = max(100, int(2 * args.idle_rate))
    watch = BacklogWatch(stack.redis.url)
    try:
        report["limits"] = {"fake_to_discarding_client": discarding_limit(stack, args.limit_seconds)}
        stack.control.set_total_rate(args.idle_rate)
        wait_for(
            lambda: not any(c["open"] for c in stack.control.counts()["connections"]), 30, "closed client"
        )
        baseline = stack.control.frames_sent()
        stack.start_collector()
        conn = psycopg2.connect(stack.postgres.url)
        report["postgres"] = {"settings": settings(conn), "timescaledb": timescale_active(conn)}
        if not report["postgres"]["timescaledb"]:
            print(
                "pipeline bench: TimescaleDB is not installed here: plain PostgreSQL tables", file=sys.stderr
            )
        started = time.monotonic()
        wait_for(lambda: count_rows(conn, "agg_trades") > 0, READY_TIMEOUT_S, "row stored")
        report["ready_s"], report["streams"] = time.monotonic() - started, stack.control.streams()
        watch.start()
        steps = [run_step(stack, watch, conn, float(rate), args) for rate in args.rates.split(",")]
        for _ in range(args.search_steps):
            rate = next_search_rate([(s["target"], s["sustained"]) for s in steps], args.step)
            if rate is None:
                break
            steps.append(run_step(stack, watch, conn, rate, args))
        report["steps"] = steps
        report["highest_sustained"] = highest_sustained([(s["target"], s["sustained"]) for s in steps])
        if args.profile > 0:
            report["profile"] = profile(stack, conn, args, stamp)
        report["peak_rss"] = stack.peak_rss()
        stack.control.pause()  # everything offered so far must now be stored, once
        wait_emptied(watch.client, args.drain_stall)
        offered = stack.control.frames_sent() - baseline
        wait_for(lambda: count_rows(conn, "agg_trades") >= offered, 30, "all rows", 1.0)
        stored = count_rows(conn, "agg_trades")
        report["whole_run"] = {"offered": offered, "stored": stored, "lost": offered - stored}
        stack.stop_processes(("beat", "worker-ingest", "worker-rest"))
        report["redis_bytes_per_envelope"] = redis_probe(
            stack, watch.client, args.idle_rate * 20, args.probe_envelopes
        )
        stack.stop_processes(("streams",))
        copy_rate, copy_rows = plain_copy_rate(conn, args.copy_rows)
        report["limits"]["plain_copy"] = {"rows_per_s": copy_rate, "rows": copy_rows}
        report["bytes_per_row"] = sizes(conn, report["postgres"]["timescaledb"])
        conn.close()
    finally:
        watch.close()
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    report["load_average_after"] = os.getloadavg()[0]
    path = args.out / f"pipeline-{stamp}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(render(report, path))
    print(json.dumps(report, default=str))
    return 0 if report["whole_run"]["lost"] == 0 else 1


LATENCY_NOTE = (
    "latency: commit time of the row's transaction (track_commit_timestamp) - its event time E, "
    "stamped by the fake as it sends; cost: 10 B per transaction, queried between windows"
)
CPU_NOTE = (
    "CPU: utime+stime of each process tree (exited children included) from the window's start until its "
    "backlog drained / messages offered meanwhile"
)


def render(report: dict[str, Any], path: Path) -> str:
    steps = report["steps"]
    groups = list(steps[0]["cpu_s"]) if steps else []
    limits, probe, whole = report["limits"], report["redis_bytes_per_envelope"], report["whole_run"]
    pg = report["postgres"]
    backend = "TimescaleDB hypertables" if pg["timescaledb"] else "plain PostgreSQL (no TimescaleDB here)"
    load = f"{report['load_average_before']:.2f} -> {report['load_average_after']:.2f}"
    lines = [
        f"pipeline benchmark: {report['streams']} aggTrade streams, {report['cores']} cores, load {load}",
        f"collector: {report['collector']}",
        f"PostgreSQL: {backend}; " + ", ".join(f"{k}={v}" for k, v in sorted(pg["settings"].items())),
        "",
        throughput_table(steps),
        "",
        cpu_table(steps, groups),
        "",
        rss_table(report["peak_rss"]),
        "",
        size_table(report["bytes_per_row"]),
        "",
        f"highest sustained rate tried: {report['highest_sustained'] or 'none'} msg/s",
        f"whole run: offered {whole['offered']:,}, stored {whole['stored']:,}, lost {whole['lost']:,}",
        f"Redis per queued envelope: {probe['used_memory_delta_per_envelope']:.0f} B (used_memory delta), "
        f"{probe['memory_usage_per_envelope']:.0f} B (MEMORY USAGE); "
        f"envelope {probe['mean_envelope_bytes']:.0f} B",
        "this machine's limits, same run:",
        f"  plain COPY of the same rows, unindexed table: {limits['plain_copy']['rows_per_s']:,.0f} rows/s",
        f"  fake -> discarding client: {limits['fake_to_discarding_client']['frames_per_s']:,.0f} frames/s",
        LATENCY_NOTE,
        CPU_NOTE,
        f"JSON: {path}",
    ]
    if "profile" in report:
        lines.append(f"profile at {report['profile']['rate']:,.0f}/s: {report['profile']['py_spy_files']}")
        for row in report["profile"]["statements"]:
            per_row = "-" if row["us_per_row"] is None else f"{row['us_per_row']:.1f}"
            lines.append(
                f"  {row['total_ms']:>10,.0f} ms {row['calls']:>8} calls {row['rows']:>10} rows "
                f"{per_row:>8} µs/row  {row['query']}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
