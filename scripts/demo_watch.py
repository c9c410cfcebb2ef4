"""Print what the running stack has recorded every few seconds: rows per table, queues, alerts.

Used by `make demo` (Procfile.demo) to show rows arriving; works against any stack, reading the
same settings (REDIS_URL, DATABASE_URL, ALERT_LOG) as the collector itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import redis
from psycopg2 import sql

from collector.db.connection import connect
from collector.errors import CollectorError
from collector.queue import keys
from collector.queue.client import redis_client
from collector.settings import Settings, load_settings


@dataclass(frozen=True)
class Sample:
    """One reading of the stack."""

    rows: dict[str, int]
    queued: dict[str, int]
    deadletters: int
    alert_lines: list[str]


def _count_rows(settings: Settings) -> dict[str, int]:
    conn = connect(settings)
    try:
        conn.autocommit = True
        counts: dict[str, int] = {}
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = '10s'")  # a huge live table must not hang the watcher
            for table in keys.TABLES:
                cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
                row = cur.fetchone()
                counts[table] = int(row[0]) if row else 0
        return counts
    finally:
        conn.close()


def _alert_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def sample(settings: Settings) -> Sample:
    """Read row counts from PostgreSQL, queue lengths from Redis and the alert log."""
    client = redis_client(settings)
    try:
        pipe = client.pipeline(transaction=False)
        for table in keys.TABLES:
            pipe.llen(keys.queue(table))
        pipe.llen(keys.DEADLETTER)
        *queued, deadletters = pipe.execute()
    finally:
        client.close()
    return Sample(
        rows=_count_rows(settings),
        queued=dict(zip(keys.TABLES, (int(n) for n in queued), strict=True)),
        deadletters=int(deadletters),
        alert_lines=_alert_lines(settings.alert_log),
    )


def render(now: Sample, before: Sample | None, interval_s: float) -> str:
    """The block printed for one sample: rows, rows per second since the last sample, queue length."""
    lines = [time.strftime("%H:%M:%S") + f"  {'table':<16}{'rows':>12}{'new/s':>10}{'queued':>10}"]
    for table in keys.TABLES:
        rate = (now.rows[table] - before.rows[table]) / interval_s if before else 0.0
        lines.append(f"          {table:<16}{now.rows[table]:>12}{rate:>10.1f}{now.queued[table]:>10}")
    lines.append(f"          dead letters: {now.deadletters}   alerts: {len(now.alert_lines)}")
    seen = len(before.alert_lines) if before else max(len(now.alert_lines) - 3, 0)
    lines += [f"          ALERT {line}" for line in now.alert_lines[seen:]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--count", type=int, default=0, help="stop after this many samples (0: never)")
    args = parser.parse_args(argv)
    settings = load_settings()
    before: Sample | None = None
    taken = 0
    while True:
        try:
            now = sample(settings)
        except (CollectorError, redis.RedisError, psycopg2.Error) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            print(f"waiting for the stack: {reason}", flush=True)
        else:
            print(render(now, before, args.interval), flush=True)
            before = now
        taken += 1
        if args.count and taken >= args.count:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
