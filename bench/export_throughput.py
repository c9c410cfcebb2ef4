"""Export benchmark: N agg_trades rows to CSV and to Parquet with `collector export`, beside `psql \\copy`.

    .venv/bin/python bench/export_throughput.py [--rows 1000000] [--repeat 2]

Starts its own PostgreSQL (TimescaleDB when installed, as `make run` does), generates N rows ending
now (so no chunk is compressed yet), runs the real CLI as a subprocess for each format and prints
rows/s and the peak RSS of that process (VmHWM). The machine's own limit is measured in the same
run: `psql \\copy` of the same rows, once with the CSV export's SELECT and once with the Parquet
export's SELECT (its numerics cast to numeric(38,18) on the server).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.db.connection import connect
from collector.db.init import init_db
from collector.export.plan import plan_export, select_statement
from collector.export.run import prepare_session, read_columns
from collector.fake.envelopes import AGG_TRADES_BULK_SQL
from collector.local.servers import pg_bin, start_postgres
from collector.settings import Settings, load_settings

COLLECTOR = str(Path(sys.executable).with_name("collector"))


@dataclass(frozen=True)
class Run:
    label: str
    seconds: float
    peak_rss_kb: int
    file_bytes: int


def _peak_rss_kb(pid: int) -> int:
    """VmHWM: the peak RSS of the program the process runs now. It starts afresh at exec, unlike
    ru_maxrss, which keeps the RSS the child inherited when it was forked from this large process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def _measure(label: str, args: list[str], env: dict[str, str], cwd: Path, output: Path) -> Run:
    """Run one command to completion: its wall time and its own peak RSS (sampled every 20 ms)."""
    started = time.perf_counter()
    process = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while True:
        peak = max(peak, _peak_rss_kb(process.pid))
        try:
            process.wait(timeout=0.02)
            break
        except subprocess.TimeoutExpired:
            continue
    elapsed = time.perf_counter() - started
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(f"{label} failed ({process.returncode}): {stderr.strip()}")
    return Run(label, elapsed, peak, output.stat().st_size)


def _fill(settings: Settings, rows: int) -> float:
    conn = connect(settings)
    started = time.perf_counter()
    with conn.cursor() as cur:
        # Rows end now: recent chunks are the ones not compressed yet, like a fresh export.
        base_ms = int(time.time() * 1000) - rows - 60_000
        cur.execute(AGG_TRADES_BULK_SQL, {"rows": rows, "symbol": "BTCUSDT", "base_ms": base_ms})
        cur.execute("ANALYZE agg_trades")
    conn.commit()
    conn.close()
    return time.perf_counter() - started


def _selects(settings: Settings) -> tuple[str, str]:
    """The SELECT each export format runs, rendered, for psql to run the same query."""
    conn = connect(settings)
    try:
        prepare_session(conn)
        csv_plan = plan_export("agg_trades", fmt="csv", output="x.csv")
        parquet_plan = plan_export("agg_trades", fmt="parquet", output="x.parquet")
        columns = read_columns(conn, csv_plan.relation)
        return (
            select_statement(csv_plan, columns).as_string(conn),
            select_statement(parquet_plan, columns).as_string(conn),
        )
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each command; the fastest counts")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="collector-bench-"))
    workdir.chmod(0o755)
    pg = start_postgres(workdir / "pg", durable=True)
    try:
        settings = load_settings(database_url=pg.url)
        with_timescale = init_db(settings).timescale
        fill_s = _fill(settings, args.rows)
        csv_select, parquet_select = _selects(settings)
        # psql renders times in the export's time zone, so the two CSV files can be compared byte for byte.
        env = {**os.environ, "DATABASE_URL": settings.database_url, "PGOPTIONS": "-c TimeZone=UTC"}
        out = workdir / "out"
        out.mkdir()

        def psql(select: str, options: str) -> list[str]:
            copy = f"\\copy ({select}) TO '{{output}}' WITH ({options})"
            return [pg_bin("psql"), "-X", "-q", "-d", settings.database_url, "-c", copy]

        export = [COLLECTOR, "export", "agg_trades", "-o", "{output}"]
        commands = {
            "psql \\copy, CSV export's SELECT": (psql(csv_select, "FORMAT csv, HEADER"), "psql.csv"),
            "collector export, CSV": (export, "export.csv"),
            "psql \\copy, Parquet export's SELECT": (psql(parquet_select, "FORMAT csv"), "psql.txt"),
            "collector export, Parquet": (export, "export.parquet"),
            "collector export, 0 rows (start-up)": ([*export, "--to", "2000-01-01"], "empty.csv"),
        }

        def run(label: str) -> Run:
            command, name = commands[label]
            argv = [a.replace("{output}", str(out / name)) for a in command]
            return _measure(label, argv, env, workdir, out / name)

        run("collector export, CSV")  # warm-up: the table in the buffer cache, the code in the page cache
        runs: dict[str, list[Run]] = {label: [] for label in commands}
        for _ in range(args.repeat):  # round-robin, so that drift affects every command alike
            for label in commands:
                runs[label].append(run(label))
        # The fastest run of each, with the highest peak RSS seen.
        best = [
            replace(min(tries, key=lambda r: r.seconds), peak_rss_kb=max(r.peak_rss_kb for r in tries))
            for tries in runs.values()
        ]
        assert filecmp.cmp(out / "export.csv", out / "psql.csv", shallow=False), "CSV differs from psql"
        assert pq.ParquetFile(out / "export.parquet").metadata.num_rows == args.rows

        mode = "TimescaleDB hypertable" if with_timescale else "plain PostgreSQL table"
        print(
            f"export: {args.rows:,} agg_trades rows ({mode}; generated in {fill_s:.1f} s), "
            f"{os.cpu_count()} CPUs, best of {args.repeat}"
        )
        print(f"{'':38} {'seconds':>8} {'rows/s':>10} {'peak RSS':>10} {'file':>10}")
        for result in best:
            rate = f"{args.rows / result.seconds:10,.0f}" if "0 rows" not in result.label else f"{'-':>10}"
            print(
                f"{result.label:38} {result.seconds:8.2f} {rate} "
                f"{result.peak_rss_kb / 1024:7.0f} MB {result.file_bytes / 1e6:7.1f} MB"
            )
        psql_csv, export_csv, psql_parquet, export_parquet, _ = best
        print(
            f"ratio to psql on the same SELECT: CSV export {psql_csv.seconds / export_csv.seconds:.0%}, "
            f"Parquet export {psql_parquet.seconds / export_parquet.seconds:.0%} "
            "(wall time of the whole process, start-up included)"
        )
        return 0
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
