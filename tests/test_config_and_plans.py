"""Settings validation, stream naming and connection plans, the beat schedule, the Timescale SQL."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from collector.binance.streams import (
    combined_url,
    connection_plans,
    family_for_futures_stream,
    futures_stream_name,
    spot_stream_name,
    stream_specs,
    table_for_stream,
)
from collector.db.init import init_db
from collector.errors import ConfigError
from collector.schedule import TASK_QUEUES, beat_schedule
from collector.settings import Settings, load_settings
from tests.conftest import TIMEOUT_FACTOR, plain_postgres

COLLECTOR = str(Path(sys.executable).with_name("collector"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no developer .env


def test_defaults_match_the_issue() -> None:
    """Default symbols, stream types and intervals are the ones the issue names."""
    s = Settings()
    assert s.spot_symbols == ["BTCUSDT", "ETHUSDT"] and s.futures_symbols == ["BTCUSDT", "ETHUSDT"]
    assert s.spot_streams == ["aggTrade", "depth@500ms"]
    assert s.futures_streams == ["aggTrade", "depth@500ms", "markPrice@arr@1s", "forceOrder"]
    assert (s.open_interest_interval_s, s.depth_snapshot_interval_s, s.depth_snapshot_limit) == (
        60,
        300,
        1000,
    )
    assert s.binance_futures_ws_url == "wss://fstream.binance.com"


def test_comma_lists_are_parsed_and_upper_cased(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPOT_SYMBOLS=btcusdt, solusdt gives upper-case symbols."""
    monkeypatch.setenv("SPOT_SYMBOLS", "btcusdt, solusdt")
    monkeypatch.setenv("FUTURES_STREAMS", "aggTrade,forceOrder")
    s = load_settings()
    assert s.spot_symbols == ["BTCUSDT", "SOLUSDT"] and s.futures_streams == ["aggTrade", "forceOrder"]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SPOT_SYMBOLS", "BTC-USDT", "SPOT_SYMBOLS: 'BTC-USDT' is not a Binance symbol"),
        ("FUTURES_STREAMS", "aggTrade,trades", "FUTURES_STREAMS: unknown stream type 'trades'"),
        ("SPOT_STREAMS", "markPrice@arr", "SPOT_STREAMS: unknown stream type 'markPrice@arr'"),
        ("OPEN_INTEREST_INTERVAL_S", "soon", "OPEN_INTEREST_INTERVAL_S: Input should be a valid number"),
        ("DEPTH_SNAPSHOT_LIMIT", "7", "DEPTH_SNAPSHOT_LIMIT: 7 is not a futures depth limit"),
        ("WEB_PORT", "70000", "WEB_PORT: Input should be less than 65536"),
        (
            "REDIS_URL",
            "redis://:secret@h:1/x",
            "REDIS_URL: the database 'x' is not a number (0, 1, ...) (got 'redis://:***@h:1/x')",
        ),
        (
            "REDIS_URL",
            "redis://h:6379/1?db=2",
            "REDIS_URL: the database goes in the path (redis://HOST:PORT/DB), not in ?db=",
        ),
        ("REDIS_URL", "unix://", "REDIS_URL: no socket path; expected unix:///PATH?db=DB"),
        ("DATABASE_URL", "postgresql://h:5432", "DATABASE_URL: no database name; expected postgresql://"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    """Every bad value raises one ConfigError line that names the variable."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert expected in str(error.value) and "\n" not in str(error.value)


# Bad values in several variables at once, each of a different kind: a field's own check, a type, a
# constraint, a check that reads another variable, a URL.
SEVERAL_BAD = {
    "SPOT_SYMBOLS": "BTC/USDT",
    "FUTURES_STREAMS": "aggTrade,trades",
    "WEB_PORT": "70000",
    "DEPTH_SNAPSHOT_LIMIT": "7",
    "TIMESCALE_AGGREGATE_LOOKBACK_H": "48",  # with TIMESCALE_RETENTION_DAYS=1 (valid itself)
    "REDIS_URL": "redis://:hunter2@h:1/x",
}
SEVERAL_BAD_ENV = SEVERAL_BAD | {"TIMESCALE_RETENTION_DAYS": "1"}


def test_every_bad_variable_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several bad settings: one ConfigError line for each, in one go (not the first only)."""
    for name, value in SEVERAL_BAD_ENV.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    lines = str(error.value).splitlines()
    assert sorted(line.split(":")[1].strip() for line in lines) == sorted(SEVERAL_BAD)
    assert all(line.startswith("configuration error: ") for line in lines)
    assert "TIMESCALE_AGGREGATE_LOOKBACK_H: 48 h must be shorter than TIMESCALE_RETENTION_DAYS" in str(
        error.value
    )
    assert "hunter2" not in str(error.value)


def test_a_check_reading_a_bad_variable_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPOT_QUOTE_ASSETS is checked against SPOT_SYMBOLS only when that one is valid: the bad
    SPOT_SYMBOLS is named, not a confusing second line built from it."""
    monkeypatch.setenv("SPOT_SYMBOLS", "BTC/USDT")
    monkeypatch.setenv("SPOT_QUOTE_ASSETS", "USDT")
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value).startswith("configuration error: SPOT_SYMBOLS: ") and "\n" not in str(error.value)


@pytest.mark.parametrize("argv", [["collector", "status"], ["celery", "-A", "collector", "worker"]])
def test_the_command_line_names_every_bad_variable(tmp_path: Path, argv: list[str]) -> None:
    """`collector` and `celery worker` with several bad settings: one line per variable on stderr,
    each `collector: configuration error: NAME: ...`, no traceback, exit 2."""
    code, out, err = _run(argv, SEVERAL_BAD_ENV, tmp_path)
    lines = err.splitlines()
    assert (code, out, len(lines)) == (2, "", len(SEVERAL_BAD)), err
    assert all(line.startswith("collector: configuration error: ") for line in lines), err
    assert {line.split(":")[2].strip() for line in lines} == set(SEVERAL_BAD)


def test_cli_prints_one_line_and_exits_2_on_bad_config(tmp_path: Path) -> None:
    """`collector init-db` with a bad setting prints one line, no traceback, exit code 2."""
    done = subprocess.run(
        [COLLECTOR, "init-db"],
        env={"SPOT_SYMBOLS": "BTC/USDT", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip().count("\n") == 0
        and "SPOT_SYMBOLS" in done.stderr
        and "Traceback" not in done.stderr
    )


def test_env_file_is_read(tmp_path: Path) -> None:
    """Settings come from a .env file in the working directory too."""
    (tmp_path / ".env").write_text("FUTURES_SYMBOLS=SOLUSDT\nALERT_COOLDOWN_S=5\n")
    s = load_settings()
    assert s.futures_symbols == ["SOLUSDT"] and s.alert_cooldown_s == 5


def test_stream_names_follow_binance() -> None:
    """Wire names are lower-case per symbol, `!`-prefixed for all-market, valid speeds only."""
    assert spot_stream_name("BTCUSDT", "aggTrade") == "btcusdt@aggTrade"
    assert spot_stream_name("BTCUSDT", "depth@500ms") == "btcusdt@depth@100ms"  # spot has no 500 ms
    assert spot_stream_name("BTCUSDT", "depth") == "btcusdt@depth"
    assert futures_stream_name("BTCUSDT", "depth@500ms") == "btcusdt@depth@500ms"
    assert futures_stream_name("BTCUSDT", "depth@250ms") == "btcusdt@depth"
    assert futures_stream_name(None, "markPrice@arr@1s") == "!markPrice@arr@1s"
    assert futures_stream_name(None, "forceOrder") == "!forceOrder@arr"
    assert futures_stream_name("ETHUSDT", "forceOrder@symbol") == "ethusdt@forceOrder"


def test_streams_route_to_tables_and_paths() -> None:
    """Depth goes to /public, the rest to /market; each stream feeds its table; partial books feed none."""
    assert [
        family_for_futures_stream(n) for n in ("btcusdt@depth@500ms", "btcusdt@aggTrade", "!forceOrder@arr")
    ] == ["public", "market", "market"]
    assert table_for_stream("btcusdt@depth@100ms") == "depth_updates"
    assert table_for_stream("btcusdt@depth") == "depth_updates"
    assert table_for_stream("btcusdt@depth20@100ms") is None
    assert table_for_stream("!markPrice@arr@1s") == "mark_prices"
    assert table_for_stream("btcusdt@markPrice") == "mark_prices"
    assert table_for_stream("!forceOrder@arr") == "force_orders"
    assert table_for_stream("btcusdt@bookTicker") is None


def test_default_plan_keeps_public_and_market_apart() -> None:
    """The default futures streams need two connections: depth on /public, the rest on /market."""
    plans = {p.connection_id: p for p in connection_plans(Settings())}
    assert set(plans) == {"spot-0", "futures-public-0", "futures-market-0"}
    assert plans["futures-public-0"].url == (
        "wss://fstream.binance.com/public/stream?streams=btcusdt@depth@500ms/ethusdt@depth@500ms"
    )
    assert plans["futures-market-0"].streams == (
        "btcusdt@aggTrade",
        "ethusdt@aggTrade",
        "!markPrice@arr@1s",
        "!forceOrder@arr",
    )
    assert plans["spot-0"].url.startswith("wss://stream.binance.com:9443/stream?streams=btcusdt@aggTrade/")


def test_many_symbols_split_across_connections() -> None:
    """Streams beyond WS_MAX_STREAMS_PER_CONNECTION go on further connections, none lost or repeated."""
    symbols = [f"S{i:03d}USDT" for i in range(250)]
    s = load_settings(spot_symbols=symbols, futures_symbols=symbols, ws_max_streams_per_connection=100)
    plans = connection_plans(s)
    assert all(len(p.streams) <= 100 for p in plans)
    spot = [n for p in plans if p.market == "spot" for n in p.streams]
    assert len(spot) == len(set(spot)) == 500
    market = [n for p in plans if p.family == "market" for n in p.streams]
    assert len(market) == 252 and market.count("!forceOrder@arr") == 1
    assert len(stream_specs(s)) == 500 + 250 + 252
    assert combined_url("ws://x/futures/", "public", ["a", "b"]) == "ws://x/futures/public/stream?streams=a/b"


def test_beat_schedule_from_settings() -> None:
    """One drain-loop keeper every second (the loops drain every table continuously), the REST poll
    tick every second (the planner spreads the calls over their intervals), each with queue and expiry."""
    s = load_settings(open_interest_interval_s=15, depth_snapshot_interval_s=120)
    schedule = beat_schedule(s)
    drains = [e for e in schedule.values() if e["task"].startswith("collector.tasks.ingest.")]
    assert [(e["task"], e["schedule"], e["args"]) for e in drains] == [
        ("collector.tasks.ingest.drain_loop", 1.0, ())
    ]
    assert schedule["rest-poll"]["task"] == "collector.tasks.rest.poll_due"
    assert schedule["rest-poll"]["schedule"] == 1.0
    assert not any("open_interest" in e["task"] or "depth_snapshot" in e["task"] for e in schedule.values())
    for entry in schedule.values():
        assert entry["options"]["queue"] == TASK_QUEUES[entry["task"]] and entry["options"]["expires"] >= 1


@plain_postgres
def test_init_db_twice_on_plain_postgres(settings: Settings) -> None:
    """init-db with TIMESCALE=off creates the database, tables and views; a second run changes nothing."""
    import psycopg2

    plain = settings.model_copy(update={"timescale": "off"})
    first = init_db(plain)
    second = init_db(plain)
    assert (first.timescale, second.timescale) == (False, False)
    assert first.changes[0] == f"database {plain.database_url.rsplit('/', 1)[1]} created"
    assert second.changes == []
    conn = psycopg2.connect(settings.database_url)
    with conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
        assert [r[0] for r in cur.fetchall()] == [
            "agg_trades",
            "alert_cursor",
            "alerts",
            "depth_gaps",
            "depth_snapshots",
            "depth_updates",
            "force_orders",
            "ingest_ranges",
            "mark_prices",
            "open_interest",
            "stream_gaps",
        ]
        cur.execute("SELECT viewname FROM pg_views WHERE schemaname = 'public' ORDER BY 1")
        assert [r[0] for r in cur.fetchall()] == ["candles_1m", "liquidations_1m", "storage_usage"]
        cur.execute("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")
        assert cur.fetchone()[0] == 0
    conn.close()


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_celery_with_a_bad_setting_is_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    """`celery -A collector worker|beat` with a bad setting prints one line naming it, exit code 2."""
    code, output = _celery(command, {"SPOT_SYMBOLS": "BTC/USDT"}, tmp_path)
    assert code == 2
    assert output.count("\n") == 0 and "SPOT_SYMBOLS" in output and "Traceback" not in output


def _celery(command: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run `celery -A collector <command>` with only `env` set: its exit code and output."""
    celery = str(Path(sys.executable).with_name("celery"))
    done = subprocess.run(
        [celery, "-A", "collector", command],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )
    return done.returncode, (done.stdout + done.stderr).strip()


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """Run a command of the venv (`collector`, `celery`) with only `env` set: exit code, stdout, stderr."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name(argv[0])), *argv[1:]],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("REDIS_URL", "redis://127.0.0.1:notaport/0", "the port is not a number from 1 to 65535"),
        (
            "REDIS_URL",
            "http://x",
            "not a Redis URL; expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///PATH?db=DB",
        ),
        ("REDIS_URL", "redis://127.0.0.1:16379/abc", "the database 'abc' is not a number (0, 1, ...)"),
        (
            "DATABASE_URL",
            "mysql://x/y",
            "not a PostgreSQL URL; expected postgresql://USER@HOST:PORT/DATABASE",
        ),
    ],
)
def test_a_malformed_service_url_is_one_line_and_exit_2_at_every_entry_point(
    tmp_path: Path, name: str, value: str, reason: str
) -> None:
    """A malformed REDIS_URL or DATABASE_URL is refused by the settings, so `collector status`,
    `collector trigger`, `celery worker` and `celery beat` print the same line naming it and exit 2
    (not a traceback from redis-py or kombu, a silent database 0, or an UNHEALTHY status)."""
    expected = f"collector: configuration error: {name}: {reason} (got {value!r})\n"
    for argv in (
        ["collector", "status"],
        ["collector", "trigger", "alerts"],
        ["celery", "-A", "collector", "worker"],
        ["celery", "-A", "collector", "beat"],
    ):
        assert _run(argv, {name: value}, tmp_path) == (2, "", expected), argv


def test_redis_refusing_the_database_gets_the_hint_that_fits(tmp_path: Path, redis_url: str) -> None:
    """A REDIS_URL naming a database the server does not have: Redis answered and refused, so the line
    says so and what to fix, not "start Redis"."""
    url = redis_url.rsplit("/", 1)[0] + "/99"
    expected = (
        f"collector: Redis at {url} refused the connection: DB index is out of range "
        "(REDIS_URL names a database this server does not have)\n"
    )
    # A worker of the `rest` queue: one that takes drains would name the (default) PostgreSQL too.
    for argv in (["celery", "-A", "collector", "worker", "-Q", "rest"], ["collector", "streams"]):
        assert _run(argv, {"REDIS_URL": url}, tmp_path) == (2, "", expected), argv
    code, out, err = _run(["collector", "status"], {"REDIS_URL": url}, tmp_path)
    assert code == 1 and err == ""
    assert f"  redis       DOWN  Redis at {url} refused the connection: DB index is out of range" in out


def test_a_unix_socket_redis_url_is_one_database_for_collector_and_celery(tmp_path: Path) -> None:
    """REDIS_URL=unix:///PATH?db=2: `collector status` (redis-py) finds Redis up, and `collector trigger`
    (kombu, through celeryconfig) puts its task in database 2 of that socket's server."""
    socket_path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(unix_socket_path=str(socket_path), db=2)
    try:
        deadline = time.monotonic() + 10 * TIMEOUT_FACTOR
        while not socket_path.exists():
            assert time.monotonic() < deadline, "redis-server made no socket"
            time.sleep(0.02)
        env = {"REDIS_URL": f"unix://{socket_path}?db=2"}
        code, out, err = _run(["collector", "trigger", "alerts"], env, tmp_path)
        assert code == 0 and out.startswith("sent collector.tasks.alerts.evaluate"), err
        assert client.llen("alerts") == 1
        assert redis.Redis(unix_socket_path=str(socket_path), db=0).dbsize() == 0
        assert "  redis       up" in _run(["collector", "status"], env, tmp_path)[1]
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)


def test_trigger_refuses_an_unknown_symbol_with_one_line(tmp_path: Path) -> None:
    """`collector trigger … --symbol X` for a symbol not configured: one line, exit 2, nothing sent."""
    done = subprocess.run(
        [COLLECTOR, "trigger", "depth-snapshot", "--market", "spot", "--symbol", "dogeusdt"],
        env={
            "SPOT_SYMBOLS": "BTCUSDT,ETHUSDT",
            "PATH": "/usr/bin:/bin",
            "REDIS_URL": "redis://127.0.0.1:1/0",
        },
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "collector: trigger depth-snapshot: DOGEUSDT is not a configured symbol "
        "(SPOT_SYMBOLS: BTCUSDT, ETHUSDT)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["open-interest", "--market", "spot", "--symbol", "BTCUSDT"],
            "trigger open-interest: --market spot does not apply (futures only)",
        ),
        (["alerts", "--symbol", "BTCUSDT"], "trigger alerts: --symbol does not apply (it takes no options)"),
        (
            ["drain", "--table", "agg_trades", "--market", "spot"],
            "trigger drain: --market does not apply (it takes --table)",
        ),
        (
            ["depth-snapshot", "--table", "agg_trades"],
            "trigger depth-snapshot: --table does not apply (it takes --symbol, --market)",
        ),
    ],
)
def test_trigger_refuses_options_that_do_not_apply(
    tmp_path: Path, redis_url: str, args: list[str], message: str
) -> None:
    """`collector trigger` with an option its task would ignore: one line, exit 2, nothing sent."""
    assert _run(["collector", "trigger", *args], {"REDIS_URL": redis_url}, tmp_path) == (
        2,
        "",
        f"collector: {message}\n",
    )
    assert redis.Redis.from_url(redis_url).dbsize() == 0


@pytest.mark.parametrize(
    ("args", "sent", "queue"),
    [
        (["drain", "--table", "agg_trades"], "collector.tasks.ingest.drain table=agg_trades", "ingest"),
        (
            ["open-interest", "--symbol", "btcusdt"],
            "collector.tasks.rest.open_interest symbol=BTCUSDT",
            "rest",
        ),
        (
            ["depth-snapshot", "--market", "spot"],
            "collector.tasks.rest.depth_snapshot market=spot symbol=all",
            "rest",
        ),
        (["alerts"], "collector.tasks.alerts.evaluate", "alerts"),
    ],
)
def test_trigger_says_what_it_sent(
    tmp_path: Path, redis_url: str, args: list[str], sent: str, queue: str
) -> None:
    """Every trigger, drain included, prints one line naming the task, its arguments and its queue,
    and the task is in that queue."""
    code, out, err = _run(["collector", "trigger", *args], {"REDIS_URL": redis_url}, tmp_path)
    assert code == 0 and err == ""
    assert re.fullmatch(rf"sent {re.escape(sent)} to queue {queue} \(id [0-9a-f-]{{36}}\)\n", out), out
    assert redis.Redis.from_url(redis_url).llen(queue) == 1
