"""`collector export`: the real CLI against real PostgreSQL, CSV and Parquet, bad input and interruptions."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from collector.db.connection import connect
from collector.db.init import init_db
from collector.db.schema import TIME_COLUMNS
from collector.drain import Drainer
from collector.errors import ConfigError
from collector.export.plan import RELATIONS, parse_time, plan_export
from collector.local.servers import LocalService
from collector.queue import keys
from collector.settings import Settings, load_settings
from tests import factories
from tests.conftest import TIMEOUT_FACTOR

COLLECTOR = str(Path(sys.executable).with_name("collector"))
BULK_ROWS = 250_000  # enough for an export to last about a second, so it can be interrupted midway

# The agg_trades of the module database: (factory index, market, symbol), 20 s apart.
AGG = [
    (k * 20_000, "futures" if k % 2 == 0 else "spot", "BTCUSDT" if k % 3 else "ETHUSDT") for k in range(12)
]
# One more row written directly, with the nullable columns NULL.
SOL_TRADE_ID = 42
SOL_TIME = datetime.fromtimestamp((factories.BASE_MS + 300_000) / 1000, tz=UTC)


def _trade_time(i: int) -> datetime:
    return datetime.fromtimestamp((factories.BASE_MS + i - 1) / 1000, tz=UTC)


def _trade_ids(rows: list[tuple[int, str, str]]) -> list[int]:
    """The aggregate trade ids of factory rows, in time order (factory ids are 1_000_000 + i)."""
    return [1_000_000 + i for i, _, _ in sorted(rows)]


@contextmanager
def _database(pg: LocalService, redis_server: LocalService, tag: str, **overrides: Any) -> Iterator[Settings]:
    """A database of its own for a module-wide fixture, created by init-db and dropped at the end."""
    name = f"collector_export_{tag}_{os.getpid()}"
    settings = load_settings(
        database_url=f"postgresql://postgres@127.0.0.1:{pg.port}/{name}",
        redis_url=redis_server.url,
        **overrides,
    )
    init_db(settings)
    # The session's Redis is shared: an earlier test's stream process may have left envelopes queued,
    # which _drain would store here too (as the `redis_url` fixture does, start from an empty Redis).
    client = redis.Redis.from_url(settings.redis_url)
    client.flushall()
    client.close()
    try:
        yield settings
    finally:
        admin = psycopg2.connect(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres")
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _drain(settings: Settings, table: str, envelopes: list[bytes]) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    client.rpush(keys.queue(table), *envelopes)
    assert Drainer(settings, client, lambda: connect(settings)).drain(table).inserted > 0
    client.close()


def _execute(settings: Settings, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    conn = connect(settings, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


@pytest.fixture(scope="module")
def source(postgres_server: LocalService, redis_server: LocalService) -> Iterator[Settings]:
    """Known rows in agg_trades, force_orders, mark_prices and depth_snapshots, through the real drain."""
    with _database(postgres_server, redis_server, "source") as settings:
        _drain(settings, "agg_trades", [factories.agg_trade(i, market, symbol) for i, market, symbol in AGG])
        _drain(settings, "force_orders", [factories.force_order(i) for i in range(3)])
        _drain(settings, "mark_prices", [factories.mark_price_frame(i) for i in range(2)])
        _drain(
            settings, "depth_snapshots", [factories.depth_snapshot(1), factories.depth_snapshot(2, "futures")]
        )
        _execute(
            settings,
            "INSERT INTO agg_trades (event_time, market, symbol, aggregate_trade_id, trade_time, price,"
            " quantity, received_at, payload) VALUES (%(t)s, 'spot', 'SOLUSDT', %(id)s, %(t)s, 180.25,"
            " 2, %(t)s, '{}')",
            {"t": SOL_TIME, "id": SOL_TRADE_ID},
        )
        # NULL, an empty string and text that CSV must quote, side by side in one text column.
        for k, status in enumerate([None, "", 'a,"b"\nc']):
            _execute(
                settings,
                "INSERT INTO force_orders (event_time, transaction_time, symbol, side, quantity, price,"
                " average_price, order_status, received_at, payload)"
                " VALUES (%(t)s, %(t)s, 'ETHUSDT', 'BUY', 1.5, 3000.12345678, NULL, %(s)s, %(t)s, %(p)s)",
                {"t": SOL_TIME.replace(second=k), "s": status, "p": json.dumps({"k": k, "text": 'q"\\'})},
            )
        yield settings


@pytest.fixture(scope="module")
def bulk(postgres_server: LocalService, redis_server: LocalService) -> Iterator[Settings]:
    """BULK_ROWS agg_trades rows, generated by PostgreSQL."""
    with _database(postgres_server, redis_server, "bulk") as settings:
        _execute(
            settings,
            factories.AGG_TRADES_BULK_SQL,
            {"rows": BULK_ROWS, "symbol": "BTCUSDT", "base_ms": factories.BASE_MS},
        )
        yield settings


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url}


def _export(settings: Settings, cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [COLLECTOR, "export", *args],
        env=_env(settings),
        capture_output=True,
        timeout=60 * TIMEOUT_FACTOR,
        cwd=cwd,
    )


def _ok(done: subprocess.CompletedProcess[bytes]) -> None:
    """Exit 0, and stderr is the one summary line."""
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export: "), lines


def _table(settings: Settings, relation: str, order: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    conn = connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT * FROM {relation} ORDER BY {order}")
            return [d.name for d in cur.description], cur.fetchall()
    finally:
        conn.close()


def _from_csv(text: str, like: object) -> object:
    """A CSV field read back as the type psycopg2 gives for the same column."""
    if like is None:
        return None if text == "" else text
    if isinstance(like, bool):
        return {"t": True, "f": False}[text]
    if isinstance(like, int):
        return int(text)
    if isinstance(like, Decimal):
        return Decimal(text)
    if isinstance(like, datetime):
        return datetime.fromisoformat(text)
    if isinstance(like, dict):
        return json.loads(text)
    return text


def _csv_rows(data: bytes) -> tuple[list[str], list[list[str]]]:
    header, *rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
    return header, rows


# --- pure: times and arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-11-24", datetime(2025, 11, 24, tzinfo=UTC)),
        ("20251124", datetime(2025, 11, 24, tzinfo=UTC)),
        ("2025-11-24T16:00:00.001", datetime(2025, 11, 24, 16, 0, 0, 1000, tzinfo=UTC)),
        ("2025-11-24 18:00+02:00", datetime(2025, 11, 24, 16, tzinfo=UTC)),
        ("2025-11-24T16:00:00Z", datetime(2025, 11, 24, 16, tzinfo=UTC)),
        ("1764000000001", datetime(2025, 11, 24, 16, 0, 0, 1000, tzinfo=UTC)),
    ],
)
def test_times_are_iso_or_epoch_ms_and_naive_means_utc(text: str, expected: datetime) -> None:
    """ISO dates and date-times (naive = UTC, offsets converted) and epoch milliseconds all parse."""
    assert parse_time(text, "--from") == expected


def test_plan_normalises_symbol_and_infers_parquet_from_the_file_name() -> None:
    """A lower-case symbol is upper-cased, `x.parquet` means Parquet, and `--market futures` on a
    futures-only table is no filter at all."""
    plan = plan_export("mark_prices", market="futures", symbol="btcusdt", output="x.parquet")
    assert (plan.symbol, plan.format, plan.market, plan.output) == (
        "BTCUSDT",
        "parquet",
        None,
        Path("x.parquet"),
    )
    assert plan_export("agg_trades", output="-").output is None


def test_registry_matches_the_schema() -> None:
    """Every market table is exportable, by the time column the schema partitions it on."""
    assert {name: RELATIONS[name].time_column for name in TIME_COLUMNS} == TIME_COLUMNS
    assert {"candles_1m", "liquidations_1m"} <= set(RELATIONS)


def test_equal_bounds_are_refused() -> None:
    """`--from` equal to `--to` selects nothing by definition, so it is refused like a reversed window."""
    with pytest.raises(ConfigError, match="is not before"):
        plan_export("agg_trades", start="2025-11-24", end="2025-11-24T00:00:00Z")


# --- CSV ------------------------------------------------------------------------------------------


def test_csv_equals_the_table(source: Settings, tmp_path: Path) -> None:
    """Unfiltered CSV has the table's columns and every row in time order, values equal once typed."""
    done = _export(source, tmp_path, "agg_trades", "-o", "trades.csv")
    _ok(done)
    header, rows = _csv_rows((tmp_path / "trades.csv").read_bytes())
    names, expected = _table(source, "agg_trades", "trade_time")
    assert header == names and len(rows) == len(expected) == len(AGG) + 1
    for got, want in zip(rows, expected, strict=True):
        assert [_from_csv(text, like) for text, like in zip(got, want, strict=True)] == list(want)
    assert done.stderr.decode().startswith(f"export: {len(AGG) + 1} rows,")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--market", "spot"], [*_trade_ids([r for r in AGG if r[1] == "spot"]), SOL_TRADE_ID]),
        (["--symbol", "ethusdt"], _trade_ids([r for r in AGG if r[2] == "ETHUSDT"])),
        # --from inclusive, --to exclusive: exactly the rows k = 3..6.
        (
            ["--from", _trade_time(AGG[3][0]).isoformat(), "--to", _trade_time(AGG[7][0]).isoformat()],
            _trade_ids(AGG[3:7]),
        ),
        (
            [
                "--from",
                str(factories.BASE_MS + AGG[3][0] - 1),
                "--to",
                str(factories.BASE_MS + AGG[7][0] - 1),
            ],
            _trade_ids(AGG[3:7]),
        ),
        (
            ["--market", "futures", "--symbol", "BTCUSDT", "--from", "2025-11-24", "--to", "2025-11-25"],
            _trade_ids([r for r in AGG if r[1] == "futures" and r[2] == "BTCUSDT"]),
        ),
    ],
)
def test_csv_filters(source: Settings, tmp_path: Path, args: list[str], expected: list[int]) -> None:
    """--market, --symbol and the half-open --from/--to window select exactly the expected rows."""
    done = _export(source, tmp_path, "agg_trades", *args)
    _ok(done)
    header, rows = _csv_rows(done.stdout)
    assert [int(row[header.index("aggregate_trade_id")]) for row in rows] == expected


def test_depth_snapshots_filter_on_market_type(source: Settings, tmp_path: Path) -> None:
    """On depth_snapshots, --market filters the `market_type` column."""
    done = _export(source, tmp_path, "depth_snapshots", "--market", "futures")
    _ok(done)
    header, rows = _csv_rows(done.stdout)
    assert [row[header.index("market_type")] for row in rows] == ["futures"]


def test_stream_gaps_filter_on_the_symbol_of_the_stream_name(source: Settings, tmp_path: Path) -> None:
    """stream_gaps has no symbol column: --symbol picks the streams named after it, not market-wide ones."""
    for k, stream in enumerate(
        ["btcusdt@depth@100ms", "ethusdt@aggTrade", "btcusdt@aggTrade", "!markPrice@arr"]
    ):
        _execute(
            source,
            "INSERT INTO stream_gaps (started_at, market, stream, ended_at, cause, connection)"
            " VALUES (%(t)s, 'futures', %(s)s, %(t)s, 'disconnect', 'futures-0')",
            {"t": SOL_TIME.replace(second=k), "s": stream},
        )
    done = _export(source, tmp_path, "stream_gaps", "--symbol", "btcusdt")
    _ok(done)
    header, rows = _csv_rows(done.stdout)
    assert [row[header.index("stream")] for row in rows] == ["btcusdt@depth@100ms", "btcusdt@aggTrade"]


def test_csv_keeps_null_apart_from_empty_text(source: Settings, tmp_path: Path) -> None:
    """NULL is an empty field, an empty string is `""`, and commas, quotes and newlines survive."""
    done = _export(source, tmp_path, "force_orders", "--symbol", "ETHUSDT")
    _ok(done)
    lines = done.stdout.decode().split("\n")
    assert ",,," in lines[1] and ',"",' in lines[2]  # NULL average_price + NULL status; then ""
    header, rows = _csv_rows(done.stdout)
    status = [row[header.index("order_status")] for row in rows]
    assert status == ["", "", 'a,"b"\nc']
    assert [json.loads(row[header.index("payload")])["text"] for row in rows] == ['q"\\'] * 3


def test_symbol_without_rows_in_the_window_is_an_empty_export(source: Settings, tmp_path: Path) -> None:
    """A symbol that has rows, but none in the window, gives the header alone (CSV, to a file or to
    standard output) or no rows (Parquet)."""
    window = ["--symbol", "BTCUSDT", "--from", "2030-01-01", "--to", "2030-01-02"]
    done = _export(source, tmp_path, "agg_trades", *window, "-o", "empty.csv")
    _ok(done)
    assert (tmp_path / "empty.csv").read_text().count("\n") == 1
    to_stdout = _export(source, tmp_path, "agg_trades", *window)
    _ok(to_stdout)
    assert to_stdout.stdout == (tmp_path / "empty.csv").read_bytes()
    _ok(_export(source, tmp_path, "agg_trades", *window, "-o", "empty.parquet"))
    table = pq.read_table(tmp_path / "empty.parquet")
    assert table.num_rows == 0 and table.schema.field("price").type == pa.decimal128(38, 18)


# --- Parquet --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relation", "order"), [("agg_trades", "trade_time"), ("force_orders", "transaction_time")]
)
def test_parquet_types_and_values_equal_the_table(
    source: Settings, tmp_path: Path, relation: str, order: str
) -> None:
    """Timestamps are UTC microsecond timestamps, numerics decimal128(38, 18), NULLs nulls, booleans
    booleans, jsonb its JSON text; every value equals the table's."""
    _ok(_export(source, tmp_path, relation, "-o", "out.parquet"))
    table = pq.read_table(tmp_path / "out.parquet")
    names, expected = _table(source, relation, order)
    assert table.column_names == names
    types = {field.name: field.type for field in table.schema}
    assert types["received_at"] == pa.timestamp("us", tz="UTC") and types["symbol"] == pa.string()
    assert types["price"] == pa.decimal128(38, 18) and types["payload"] == pa.string()
    if relation == "agg_trades":
        assert types["aggregate_trade_id"] == pa.int64() and types["is_buyer_maker"] == pa.bool_()
    got = [tuple(row.values()) for row in table.to_pylist()]
    payload = names.index("payload")
    assert [row[:payload] + row[payload + 1 :] for row in got] == [
        row[:payload] + row[payload + 1 :] for row in expected
    ]
    assert [json.loads(row[payload]) for row in got] == [row[payload] for row in expected]
    if relation == "force_orders":
        assert [row["order_status"] for row in table.to_pylist()][-3:] == [None, "", 'a,"b"\nc']
    else:
        assert [row["is_buyer_maker"] for row in table.to_pylist()].count(None) == 1


def test_views_export_in_both_database_modes(settings_each_mode: Settings, tmp_path: Path) -> None:
    """candles_1m (with --market) and liquidations_1m export like tables, on hypertables and plain tables."""
    settings = settings_each_mode
    init_db(settings)
    _drain(settings, "agg_trades", [factories.agg_trade(i, market, symbol) for i, market, symbol in AGG])
    _drain(settings, "force_orders", [factories.force_order(i) for i in range(3)])
    _ok(_export(settings, tmp_path, "candles_1m", "--market", "futures", "-o", "candles.csv"))
    header, rows = _csv_rows((tmp_path / "candles.csv").read_bytes())
    names, expected = _table(settings, "candles_1m WHERE market = 'futures'", "bucket, symbol")
    assert header == names and len(rows) == len(expected) > 1
    typed = [
        tuple(_from_csv(text, like) for text, like in zip(row, want, strict=True))
        for row, want in zip(sorted(rows, key=lambda r: (r[2], r[1])), expected, strict=True)
    ]
    assert typed == expected
    _ok(_export(settings, tmp_path, "liquidations_1m", "--market", "futures", "-o", "liq.parquet"))
    table = pq.read_table(tmp_path / "liq.parquet")
    names, expected = _table(settings, "liquidations_1m", "bucket, symbol, side")
    assert table.column_names == names and table.schema.field("bucket").type == pa.timestamp("us", tz="UTC")
    assert [tuple(row.values()) for row in table.to_pylist()] == expected


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trades"], "not a known table or view (one of agg_trades, "),
        (["mark_prices", "--market", "spot"], "mark_prices holds futures data only"),
        (["agg_trades", "--from", "2025-11-25", "--to", "2025-11-24"], "is not before --to"),
        (["agg_trades", "--to", "yesterday"], "--to: cannot read 'yesterday' as a time"),
        (
            ["agg_trades", "--symbol", "DOGEUSDT", "-o", "out.csv"],
            "no rows for symbol DOGEUSDT in agg_trades",
        ),
        (
            ["agg_trades", "--market", "futures", "--symbol", "SOLUSDT"],
            "no rows for symbol SOLUSDT (futures)",
        ),
        (["agg_trades", "--symbol", "XYZ"], "no rows for symbol XYZ in agg_trades"),
        (["agg_trades", "--format", "parquet"], "parquet cannot go to standard output"),
        (["agg_trades", "-o", "missing/out.csv"], "directory missing does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    source: Settings, tmp_path: Path, args: list[str], message: str
) -> None:
    """Each mistake prints exactly one stderr line naming it, exits 2 and writes nothing: no file, and
    on standard output not even the CSV header (a symbol without rows is known only after the COPY)."""
    done = _export(source, tmp_path, *args)
    stderr = done.stderr.decode()
    assert done.returncode == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("collector: ") and message in stderr, stderr
    assert list(tmp_path.iterdir()) == []
    assert done.stdout == b""


# --- interruptions --------------------------------------------------------------------------------


def _wait_for_temp_file(directory: Path, process: subprocess.Popen[bytes]) -> Path:
    deadline = time.monotonic() + 20 * TIMEOUT_FACTOR
    while time.monotonic() < deadline:
        temps = [p for p in directory.iterdir() if p.name.endswith(".part")]
        if temps and temps[0].stat().st_size > 0:
            return temps[0]
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        time.sleep(0.005)
    raise AssertionError("the export wrote nothing in time")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [pytest.param(signal.SIGTERM, 143, id="SIGTERM"), pytest.param(signal.SIGINT, 130, id="SIGINT")],
)
def test_interrupted_export_leaves_no_file(
    bulk: Settings, tmp_path: Path, fmt: str, signum: int, exit_code: int
) -> None:
    """SIGTERM or Ctrl-C midway: the temporary file goes, the previous file under the final name stays."""
    final = tmp_path / f"trades.{fmt}"
    final.write_text("previous export\n")
    process = subprocess.Popen(
        [COLLECTOR, "export", "agg_trades", "-o", str(final)],
        env=_env(bulk),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    _wait_for_temp_file(tmp_path, process)
    process.send_signal(signum)
    stderr = process.communicate(timeout=30 * TIMEOUT_FACTOR)[1].decode()
    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
    assert final.read_text() == "previous export\n"


def test_database_failure_midway_is_one_line_and_no_file(bulk: Settings, tmp_path: Path) -> None:
    """The server ending the session mid-export: one line naming PostgreSQL, exit 2, no file at all."""
    process = subprocess.Popen(
        [COLLECTOR, "export", "agg_trades", "-o", "trades.parquet"],
        env=_env(bulk),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    _wait_for_temp_file(tmp_path, process)
    terminated = _execute(
        bulk,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND query LIKE 'COPY (SELECT%%' AND pid <> pg_backend_pid()",
    )
    assert terminated == [(True,)]
    stderr = process.communicate(timeout=30 * TIMEOUT_FACTOR)[1].decode()
    assert process.returncode == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("collector: PostgreSQL failed during the export: "), stderr
    assert list(tmp_path.iterdir()) == []


def test_bulk_export_counts_every_row(bulk: Settings, tmp_path: Path) -> None:
    """A complete export of many rows: the summary and the file agree with the table."""
    done = _export(bulk, tmp_path, "agg_trades", "--market", "spot", "-o", "spot.parquet")
    assert done.returncode == 0, done.stderr.decode()
    summary = done.stderr.decode().splitlines()[-1]
    assert summary.startswith(f"export: {BULK_ROWS // 2:,} rows,") and summary.endswith("spot.parquet")
    assert pq.ParquetFile(tmp_path / "spot.parquet").metadata.num_rows == BULK_ROWS // 2
