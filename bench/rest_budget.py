"""REST budget soak: a real rest worker and beat poll many symbols at the default intervals against the
fake exchange (which answers 429 past Binance's weight limit and bans with 418 after a 429) for one
full cycle; the pace each symbol was polled at, beside the weight limit of the same run.

Run: `.venv/bin/python bench/rest_budget.py [--spot 300] [--futures 300] [--seconds 400]`. It starts
its own redis-server, the fake exchange (in this process), `celery -A collector worker -Q rest` and
`celery -A collector beat`, leaves them for `--seconds` (longer than the longest stretched interval,
to see every symbol come round), then reads the fake's own accounting and the queued REST bodies:

- per market: answers by status (any 429 or 418 is a failure), the highest weight of a minute
  beside the exchange's limit, and the plan the collector announced (stretch, intervals);
- per poll kind: how many symbols were polled, when the last one was first polled, and the shortest
  and longest time between two polls of one symbol (the interval, if the calls are spread evenly).

Exit code 1 when the fake answered 429/418, a minute passed its limit, or a symbol was never polled.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import redis
from processes import stop  # bench/processes.py, beside this script

from collector.fake.server import FakeExchange
from collector.local.servers import start_redis
from collector.queue import keys

BIN = Path(sys.executable).parent


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def polls_seen(client: redis.Redis) -> dict[tuple[str, str, str], list[float]]:
    """(table, market, symbol) -> receive times (s) of the REST bodies queued for the drain."""
    seen: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for table in ("open_interest", "depth_snapshots"):
        for raw in client.lrange(keys.queue(table), 0, -1):
            envelope = orjson.loads(raw)
            seen[(table, envelope["market"], envelope["symbol"])].append(envelope["received_at_us"] / 1e6)
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spot", type=int, default=300, help="spot symbols")
    parser.add_argument("--futures", type=int, default=300, help="USD-M symbols")
    parser.add_argument("--seconds", type=float, default=400.0, help="how long the worker and beat run")
    args = parser.parse_args()
    spot = [f"S{i:04d}USDT" for i in range(args.spot)]
    futures = [f"F{i:04d}USDT" for i in range(args.futures)]
    with tempfile.TemporaryDirectory(prefix="rest-budget-") as scratch:
        work = Path(scratch)
        server = start_redis(work / "redis")
        try:
            with FakeExchange(port=0, spot_symbols=spot, futures_symbols=futures, rate=1) as fake:
                env = {
                    "REDIS_URL": server.url,
                    "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/unused",  # REST tasks never use it
                    "BINANCE_SPOT_REST_URL": fake.spot_rest_url,
                    "BINANCE_FUTURES_REST_URL": fake.futures_rest_url,
                    "SPOT_SYMBOLS": ",".join(spot),
                    "FUTURES_SYMBOLS": ",".join(futures),
                }
                celery = str(BIN / "celery")
                processes = [
                    start(
                        [
                            celery,
                            "-A",
                            "collector",
                            "worker",
                            "-Q",
                            "rest",
                            "-n",
                            "rest@%h",
                            "--loglevel=INFO",
                        ],
                        env,
                        work / "worker.log",
                    ),
                    start(
                        [
                            celery,
                            "-A",
                            "collector",
                            "beat",
                            "--loglevel=INFO",
                            "--schedule",
                            str(work / "beat-schedule"),
                        ],
                        env,
                        work / "beat.log",
                    ),
                ]
                started = time.time()
                time.sleep(args.seconds)
                with urllib.request.urlopen(f"{fake.control_url}/rest_stats", timeout=10) as answer:
                    stats: dict[str, Any] = json.loads(answer.read())
                client = redis.Redis.from_url(server.url)
                plans = {m.decode(): orjson.loads(v) for m, v in client.hgetall(keys.REST_PLAN).items()}
                seen = polls_seen(client)
                client.close()
                for process in processes:
                    stop(process)
                logs = (work / "worker.log").read_text() + (work / "beat.log").read_text()
        finally:
            server.stop()
    return report(args, spot, futures, started, stats, plans, seen, logs)


def report(
    args: argparse.Namespace,
    spot: list[str],
    futures: list[str],
    started: float,
    stats: dict[str, Any],
    plans: dict[str, Any],
    seen: dict[tuple[str, str, str], list[float]],
    logs: str,
) -> int:
    ok = True
    print(
        f"REST budget soak: {len(spot)} spot + {len(futures)} USD-M symbols at the default intervals, "
        f"{args.seconds:.0f} s"
    )
    for market in ("spot", "futures"):
        answered, limit = stats[market]["answered"], stats[market]["limit_1m"]
        busiest = max(stats[market]["weight_by_minute"].values(), default=0)
        plan = plans.get(market, {})
        print(
            f"  {market:8} answers {answered}  busiest minute {busiest} of the exchange's {limit}  "
            f"plan stretch {plan.get('stretch')} intervals {plan.get('intervals_s')}"
        )
        ok &= "429" not in answered and "418" not in answered and busiest <= limit
    for table, market, symbols in (
        ("open_interest", "futures", futures),
        ("depth_snapshots", "futures", futures),
        ("depth_snapshots", "spot", spot),
    ):
        times = [sorted(seen[(table, market, symbol)]) for symbol in symbols]
        polled = [t for t in times if t]
        between = [b - a for t in polled for a, b in itertools.pairwise(t)]
        interval = plans.get(market, {}).get("intervals_s", {}).get(table)
        print(
            f"  {table}/{market}: interval {interval} s; polled {len(polled)}/{len(symbols)} symbols, "
            f"the last first at {max((t[0] for t in polled), default=0) - started:.0f} s; "
            f"between two polls of one symbol {min(between, default=0):.0f}-{max(between, default=0):.0f} s"
        )
        ok &= len(polled) == len(symbols)
    print(f"  logs: {logs.count('Traceback')} tracebacks, {logs.count('WARNING')} WARNING lines")
    print("no 429, no 418, every symbol polled: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
