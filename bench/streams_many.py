"""Many streams: `collector streams` with ~2,000 streams against the fake, peak RSS and longest loop block.

Run: `.venv/bin/python bench/streams_many.py [--seconds 30] [--rate 1000]`. It starts its own
redis-server and fake exchange (`collector fake-exchange --spot-symbol-count 1500
--futures-symbol-count 500`, a separate process; RATE events/s per connection), then measures in turn:

1. this machine's limits, same run:
   - the peak RSS of a bare interpreter that imports what `collector streams` imports;
   - a minimal client that holds the same connections and discards every frame: frames/s it gets
     from the fake, its own longest event-loop block and its peak RSS (after the stream process);
   - an idle event loop in a process of its own, running beside the stream process for the whole
     measurement: its longest block is how long this machine alone kept a ready process waiting
     (other users' processes included; the machine is shared);
2. the stream process (`collector streams`, real subprocess, `*_SYMBOLS=ALL` with `*_QUOTE_ASSETS=USDT`,
   ~2,000 streams): events/s committed to Redis, CPU%, peak RSS (VmHWM), and the longest event-loop
   block of its whole run, start-up included, as its own lag monitor published it
   (`collector:streams:loop`), and the blocks it logged split by cause: `busy` (its own thread was on
   the CPU for most of it) or `starved` (it was waiting for a core). Halfway through, 10 spot symbols
   are delisted and 10 listed on the fake, so one live refresh (UNSUBSCRIBE/SUBSCRIBE, a new
   connection) falls inside the measurement.

`--tls` runs the same over wss:// and https:// (the fake's `--tls`: a CA made at start, trusted
through SSL_CERT_FILE and REQUESTS_CA_BUNDLE); `--loop asyncio|uvloop` picks the stream process's
event loop (STREAM_UVLOOP).

The targets are a peak RSS under 250 MB and no event-loop block of 100 ms or more; exit code 1 if missed.
The Redis queues are emptied as the run goes (the rate is read from the audit counters), so Redis's
own memory does not grow with the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis
from processes import cpu_percent, cpu_sample, peak_rss_mb, stop  # bench/processes.py, beside this script
from websockets.asyncio.client import connect

from collector.binance.streams import connection_plans
from collector.fake.tls import CA_FILE_NAME
from collector.local.servers import LocalService, free_port, start_redis, wait_for_port
from collector.queue import keys
from collector.queue.loop_lag import read_loop_lag
from collector.queue.shards import present_lanes
from collector.queue.symbols import read_symbols
from collector.settings import Market, load_settings
from collector.streams.lag import LoopLagMonitor
from collector.streams.symbols import with_symbols

RSS_TARGET_MB = 250.0
BLOCK_TARGET_MS = 100.0
SPOT_SYMBOLS, FUTURES_SYMBOLS = 1500, 500
CHURN = 10  # spot symbols delisted and listed halfway through
BIN = Path(sys.executable).parent
# What `collector streams` imports before it opens a socket: the bare interpreter's share of its RSS.
IMPORTS = "import collector.cli, collector.streams.runner"


def bare_interpreter_rss_mb() -> float:
    """Peak RSS of `python -c "<IMPORTS>"`: what the stream process costs before its first socket."""
    code = (
        f"{IMPORTS}\nfrom pathlib import Path\n"
        "print([l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[1]) / 1024


# --- the discarding client (run as a subprocess: its own loop, its own RSS) -------------------------


async def discard(urls: list[str], seconds: float) -> dict[str, float]:
    """Hold every URL, count and drop each frame, and watch this process's event loop."""
    monitor = LoopLagMonitor()
    watch = asyncio.create_task(monitor.run())
    frames = 0

    async def hold(url: str, deadline: float) -> None:
        nonlocal frames
        async with connect(
            url, ping_interval=None, compression=None, max_size=None, max_queue=4096, close_timeout=0.5
        ) as ws:
            while time.monotonic() < deadline:
                await ws.recv(decode=False)
                frames += 1

    warmup_end = time.monotonic() + 2.0
    deadline = warmup_end + seconds
    tasks = [asyncio.create_task(hold(url, deadline)) for url in urls]
    await asyncio.sleep(max(0.0, warmup_end - time.monotonic()))
    start_frames, start = frames, time.monotonic()
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    rate = (frames - start_frames) / (time.monotonic() - start)
    watch.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"frames_per_s": rate, "max_block_ms": monitor.stats.max_ms, "peak_rss_mb": peak_rss_mb()}


async def idle_loop(seconds: float) -> dict[str, float]:
    """Only the lag monitor, nothing else on the loop: the machine's own scheduling delays."""
    monitor = LoopLagMonitor()
    try:
        await asyncio.wait_for(monitor.run(), seconds)
    except TimeoutError:
        pass
    return {"max_block_ms": monitor.stats.max_ms, "blocks_over": monitor.stats.over}


def discarding_client(
    urls: list[str], seconds: float, workdir: Path, env: dict[str, str]
) -> dict[str, float]:
    url_file = workdir / "urls.json"
    url_file.write_text(json.dumps(urls))
    args = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--discard",
        str(url_file),
        "--seconds",
        str(seconds),
    ]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)  # env: the TLS CA
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --- the run --------------------------------------------------------------------------------------


def start_fake(port: int, rate: float, log: Path, tls_dir: Path | None) -> subprocess.Popen[bytes]:
    args = [
        str(BIN / "collector"),
        "fake-exchange",
        "--rate",
        str(rate),
        "--port",
        str(port),
        "--spot-symbol-count",
        str(SPOT_SYMBOLS),
        "--futures-symbol-count",
        str(FUTURES_SYMBOLS),
        *(["--tls", "--tls-dir", str(tls_dir)] if tls_dir is not None else []),
    ]
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_for_port(port)
    return process


def committed(client: redis.Redis) -> int:
    """Events the stream process has committed to Redis so far (its audit counters, all tables)."""
    return sum(int(v) for v in client.hgetall(keys.AUDIT_QUEUED).values())


def empty_queues(client: redis.Redis) -> None:
    pipe = client.pipeline(transaction=False)
    for table, shard in present_lanes(client, keys.TABLES, 1):  # every queue shard (QUEUE_SHARDS)
        pipe.delete(keys.queue(table, shard))
    pipe.execute()


def connected(client: redis.Redis) -> tuple[int, int]:
    """(connections connected, connections registered) as the stream process mirrors them."""
    states = [json.loads(v) for v in client.hgetall(keys.CONNECTIONS).values()]
    return sum(s["state"] == "connected" for s in states), len(states)


def logged_blocks(log: str) -> dict[str, list[tuple[float, float]]]:
    """The loop blocks the stream process logged, by cause: (block ms, CPU ms of its own thread)."""
    found: dict[str, list[tuple[float, float]]] = {"busy": [], "starved": []}
    for line in log.splitlines():
        if "streams.loop_blocked" not in line:
            continue
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        found[fields["cause"]].append((float(fields["block_ms"]), float(fields["cpu_ms"])))
    return found


def control(base: str, action: str, market: str, symbol: str, context: ssl.SSLContext | None) -> None:
    url = f"{base}/_fake/{action}?market={market}&symbol={symbol}"
    request = urllib.request.Request(url, method="POST")
    urllib.request.urlopen(request, timeout=10, context=context).read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measured run of the stream process")
    parser.add_argument("--rate", type=float, default=1000.0, help="the fake's events/s per connection")
    parser.add_argument("--tls", action="store_true", help="wss:// and https:// from a fake serving TLS")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="STREAM_UVLOOP")
    parser.add_argument("--discard", type=Path, help=argparse.SUPPRESS)  # the discarding client's mode
    parser.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)  # the idle loop's mode
    args = parser.parse_args()
    if args.discard is not None:
        print(json.dumps(asyncio.run(discard(json.loads(args.discard.read_text()), args.seconds))))
        return 0
    if args.idle:
        print(json.dumps(asyncio.run(idle_loop(args.seconds))))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="bench-many-"))
    redis_server: LocalService | None = None
    fake: subprocess.Popen[bytes] | None = None
    try:
        redis_server = start_redis(workdir / "redis")
        port = free_port()
        tls_dir = workdir / "tls" if args.tls else None
        fake = start_fake(port, args.rate, workdir / "fake.log", tls_dir)
        ws, http = ("wss", "https") if args.tls else ("ws", "http")
        context: ssl.SSLContext | None = None
        trust: dict[str, str] = {}
        if tls_dir is not None:
            ca_file = str(tls_dir / CA_FILE_NAME)
            context = ssl.create_default_context(cafile=ca_file)
            trust = {"SSL_CERT_FILE": ca_file, "REQUESTS_CA_BUNDLE": ca_file}
        env = {
            **os.environ,
            **trust,
            "STREAM_UVLOOP": "true" if args.loop == "uvloop" else "false",
            "REDIS_URL": redis_server.url,
            "BINANCE_SPOT_WS_URL": f"{ws}://127.0.0.1:{port}/spot",
            "BINANCE_FUTURES_WS_URL": f"{ws}://127.0.0.1:{port}/futures",
            "BINANCE_SPOT_REST_URL": f"{http}://127.0.0.1:{port}/spot",
            "BINANCE_FUTURES_REST_URL": f"{http}://127.0.0.1:{port}/futures",
            "SPOT_SYMBOLS": "ALL",
            "FUTURES_SYMBOLS": "ALL",
            "SPOT_QUOTE_ASSETS": "USDT",
            "FUTURES_QUOTE_ASSETS": "USDT",
            "SYMBOLS_REFRESH_INTERVAL_S": "5",
            # Nothing drains here: without a cap this high the queues pass REDIS_MAX_QUEUE_BYTES within
            # seconds and the process measured would be spilling to disk, not pushing into Redis.
            "REDIS_MAX_QUEUE_BYTES": os.environ.get("REDIS_MAX_QUEUE_BYTES", str(64 << 30)),
        }
        os.chdir(workdir)  # no stray .env
        client = redis.Redis.from_url(redis_server.url)
        bare_mb = bare_interpreter_rss_mb()
        load_before = f"{os.getloadavg()[0]:.2f}"

        with (workdir / "streams.log").open("wb") as log:
            streams = subprocess.Popen(
                [str(BIN / "collector"), "streams"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                up, registered = connected(client)
                if registered and up == registered and read_symbols(client, "spot"):
                    break
                time.sleep(0.2)
            settle_s = time.monotonic() - (deadline - 60)
            symbols: dict[Market, list[str]] = {
                "spot": read_symbols(client, "spot") or [],
                "futures": read_symbols(client, "futures") or [],
            }
            settings = with_symbols(load_settings(redis_url=redis_server.url), symbols)
            settings = settings.model_copy(
                update={
                    "binance_spot_ws_url": env["BINANCE_SPOT_WS_URL"],
                    "binance_futures_ws_url": env["BINANCE_FUTURES_WS_URL"],
                }
            )
            plans = connection_plans(settings)
            stream_count = sum(len(plan.streams) for plan in plans)
            time.sleep(2.0)
            idle = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--idle", "--seconds", str(args.seconds)],
                stdout=subprocess.PIPE,
                text=True,
            )
            before, cpu_before = committed(client), cpu_sample(streams.pid)
            churned = False
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                time.sleep(1.0)
                empty_queues(client)
                if not churned and time.monotonic() > end - args.seconds / 2:
                    churned = True
                    for index in range(CHURN):
                        base = f"{http}://127.0.0.1:{port}"
                        control(base, "delist", "spot", symbols["spot"][-1 - index], context)
                        control(base, "list", "spot", f"ZNEW{index}USDT", context)
            after, cpu_after = committed(client), cpu_sample(streams.pid)
            rss_mb = peak_rss_mb(streams.pid)
            idle_out, _ = idle.communicate(timeout=30)
            idle_loop_lag = json.loads(idle_out.strip().splitlines()[-1])
            lag = read_loop_lag(client)
            spot_now = read_symbols(client, "spot") or []
            refreshed = all(f"ZNEW{i}USDT" in spot_now for i in range(CHURN))
            code = stop(streams)
        # The machine's floor, measured on the same connections after the stream process is gone.
        floor = discarding_client([plan.url for plan in plans], 10.0, workdir, env)
        blocks = logged_blocks((workdir / "streams.log").read_text(errors="replace"))
        elapsed = cpu_after.wall - cpu_before.wall
        rate = (after - before) / elapsed
        block_ms = lag.max_block_ms if lag is not None else float("nan")

        print(
            f"stream process over {ws}:// on {args.loop}, {stream_count:,} streams on "
            f"{len(plans)} connections ({len(symbols['spot'])} spot + {len(symbols['futures'])} "
            f"USD-M symbols, all connected after {settle_s:.1f} s)"
        )
        print(f"  measured                 {elapsed:12.1f} s after 2 s of warm-up, one live refresh halfway")
        print(f"  committed into Redis     {rate:12,.0f} events/s")
        print(f"  CPU                      {cpu_percent(cpu_before, cpu_after):12.0f} % of one core")
        print(f"  peak RSS                 {rss_mb:12.1f} MB   (target < {RSS_TARGET_MB:.0f} MB)")
        over = lag.blocks_over if lag else "?"
        own_ms = lag.max_cpu_ms if lag is not None else float("nan")
        print(
            f"  longest loop block       {block_ms:12.1f} ms   (target < {BLOCK_TARGET_MS:.0f} ms; "
            f"whole run, start-up included; {over} over {BLOCK_TARGET_MS:.0f} ms)"
        )
        print(f"  most own CPU in a block  {own_ms:12.1f} ms   (the rest of a block is waiting for a core)")
        for cause, meaning in (("busy", "its own work"), ("starved", "waiting for a core")):
            worst = max(blocks[cause], default=(0.0, 0.0))
            print(
                f"    WARNINGs, {cause:<8}{len(blocks[cause]):9d}   ({meaning}; worst {worst[0]:.0f} ms, "
                f"{worst[1]:.0f} ms of it on CPU)"
            )
        followed = "yes" if refreshed else "NO"
        print(f"  refresh followed         {followed:>12}   ({CHURN} delisted, {CHURN} listed)")
        print(f"  exit code on SIGTERM     {code:12d}")
        print("this machine's limits, same run")
        print(f"  load average             {load_before} -> {os.getloadavg()[0]:.2f} (2 cores, shared)")
        print(f"  bare interpreter RSS     {bare_mb:12.1f} MB   ({IMPORTS})")
        print(
            f"  fake -> discarding client{floor['frames_per_s']:12,.0f} frames/s on the same {len(plans)} "
            f"connections (rate {args.rate:g}/s each)"
        )
        print(f"  its longest loop block   {floor['max_block_ms']:12.1f} ms")
        print(f"  its peak RSS             {floor['peak_rss_mb']:12.1f} MB")
        print(
            f"  idle loop beside it      {idle_loop_lag['max_block_ms']:12.1f} ms   (a process doing nothing "
            f"else, same window; {idle_loop_lag['blocks_over']} over {BLOCK_TARGET_MS:.0f} ms)"
        )
        met = rss_mb < RSS_TARGET_MB and block_ms < BLOCK_TARGET_MS and refreshed and code == 0
        verdict = "met" if met else "MISSED"
        if not met and rss_mb < RSS_TARGET_MB and own_ms < BLOCK_TARGET_MS <= block_ms:
            verdict += " (its own work stayed under the target: the blocks were waits for a core)"
        print(f"targets (RSS < {RSS_TARGET_MB:.0f} MB, block < {BLOCK_TARGET_MS:.0f} ms): {verdict}")
        return 0 if met else 1
    finally:
        if fake is not None:
            stop(fake)
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
