"""Stream processes that share the symbols (`collector streams --shard i/n`), one Redis and one PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from collector.binance.streams import stream_specs
from collector.db.init import init_db
from collector.fake.server import FakeExchange
from collector.local.servers import free_port
from collector.queue import keys
from collector.queue.stream_shards import HEARTBEAT_STALE_S, ShardRecord
from collector.settings import Settings, load_settings
from collector.streams.ledger import GapLedger
from collector.streams.registry import Heartbeat, claim
from collector.streams.shard import Shard, parse_shard
from collector.streams.sink import Sink, SinkOptions
from collector.web.health import assess, now_us, snapshot
from collector.web.health_judge import shard_reasons
from collector.web.metrics import make_registry
from collector.web.status import format_status
from tests.processes import Process, celery_beat, celery_worker, collector_env, wait_until
from tests.test_end_to_end import DB_KEYS, _db_keys, _ledger_keys

COLLECTOR = str(Path(sys.executable).with_name("collector"))
# CRC-32 puts BTCUSDT and ADAUSDT in shard 1 of 2, ETHUSDT and SOLUSDT in shard 0.
SYMBOLS = "BTCUSDT,ETHUSDT,SOLUSDT,ADAUSDT"


def test_shards_split_every_stream_once_and_keep_a_symbol_whole() -> None:
    """Every stream is in exactly one shard, all of a symbol's streams in the same one, and the
    market-wide streams in shard 0."""
    settings = load_settings(spot_symbols=SYMBOLS, futures_symbols=SYMBOLS)
    names = [spec.name for spec in stream_specs(settings)]
    for count in (1, 2, 3, 5):
        shards = [Shard(i, count) for i in range(count)]
        for name in names:
            assert sum(shard.owns_stream(name) for shard in shards) == 1, (name, count)
    two = [Shard(0, 2), Shard(1, 2)]
    assert {s.index for s in two if s.owns_symbol("BTCUSDT")} == {1}
    assert {s.index for s in two if s.owns_symbol("ETHUSDT")} == {0}
    assert all(Shard(0, 2).owns_stream(name) for name in ("!forceOrder@arr", "!markPrice@arr@1s"))
    assert not Shard(1, 2).owns_stream("!forceOrder@arr")
    by_symbol = {name.split("@")[0]: {s.index for s in two if s.owns_stream(name)} for name in names}
    assert all(len(owners) == 1 for owners in by_symbol.values())
    assert Shard(1, 2).owns_connection("s1of2-spot-0") and not Shard(0, 2).owns_connection("s1of2-spot-0")
    assert Shard().owns_connection("spot-0") and not Shard(0, 2).owns_connection("spot-0")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0/0", "'0/0': the shard count must be at least 1"),
        ("3/2", "'3/2': the shard index counts from 0 and must be below 2"),
        ("x", "'x' is not a shard: give i/n"),
    ],
)
def test_a_bad_shard_is_refused_in_one_line(value: str, problem: str, settings: Settings) -> None:
    """`--shard` and STREAM_SHARD refuse a value that is no shard, with one line and exit 2."""
    with pytest.raises(ValueError, match="shard"):
        parse_shard(value)
    flag = subprocess.run(
        [COLLECTOR, "streams", "--shard", value], capture_output=True, text=True, timeout=60
    )
    assert flag.returncode == 2 and len(flag.stderr.splitlines()) == 1, flag.stderr
    assert flag.stderr.startswith("collector: --shard: ") and problem in flag.stderr
    env = {**os.environ, "STREAM_SHARD": value}
    variable = subprocess.run([COLLECTOR, "streams"], capture_output=True, text=True, timeout=60, env=env)
    assert variable.returncode == 2 and len(variable.stderr.splitlines()) == 1, variable.stderr
    assert (
        variable.stderr.startswith("collector: configuration error: STREAM_SHARD: ")
        and problem in variable.stderr
    )


def test_each_shard_takes_and_saves_only_its_own_ledger_state(settings: Settings) -> None:
    """A shard starting takes the saved depth ids, outages and open gaps of its own symbols and
    streams from Redis, leaving the other shard's; its clean stop writes its own back and marks its
    record stopped."""
    client = redis.Redis.from_url(settings.redis_url)
    outage = orjson.dumps({"started_at_us": 5, "cause": "shutdown", "connection": "x"})
    client.hset(keys.DEPTH_LAST_UPDATE_ID, mapping={"spot/BTCUSDT": 10, "spot/ETHUSDT": 20})
    client.hset(
        keys.STREAM_OUTAGES,
        mapping={
            "spot/btcusdt@aggTrade": outage,
            "futures/!forceOrder@arr": outage,
            "spot/ethusdt@depth": outage,
        },
    )
    client.hset(
        keys.OPEN_GAPS, mapping={"stream/spot/btcusdt@aggTrade": outage, "stream/spot/ethusdt@depth": outage}
    )

    async def start_and_stop() -> dict[tuple[str, str], int | None]:
        aclient = redis.asyncio.Redis.from_url(settings.redis_url)
        sink = Sink(aclient, SinkOptions(0.05, 100, 1000), run="r1-1-s0of2")
        ledger = GapLedger(sink, _no_snapshot, heartbeat=Heartbeat(Shard(0, 2), sink.run_id))
        await ledger.load(aclient)
        taken = {key: state.last_u for key, state in ledger.tracker.symbols.items()}
        assert set(ledger.open_streams) == {("futures", "!forceOrder@arr"), ("spot", "ethusdt@depth")}
        await ledger.save(aclient)
        await aclient.aclose()
        return taken

    assert asyncio.run(start_and_stop()) == {("spot", "ETHUSDT"): 20}
    assert client.hgetall(keys.DEPTH_LAST_UPDATE_ID) == {b"spot/BTCUSDT": b"10", b"spot/ETHUSDT": b"20"}
    assert set(client.hkeys(keys.STREAM_OUTAGES)) == {
        b"spot/btcusdt@aggTrade",
        b"futures/!forceOrder@arr",
        b"spot/ethusdt@depth",
    }
    assert set(client.hkeys(keys.OPEN_GAPS)) == {
        b"stream/spot/btcusdt@aggTrade",  # shard 1's: untouched
        b"stream/futures/!forceOrder@arr",
        b"stream/spot/ethusdt@depth",
    }
    record = ShardRecord.from_json("0/2", client.hget(keys.STREAM_SHARDS, "0/2") or b"")
    assert (record.state, record.run) == ("stopped", "r1-1-s0of2")


def test_health_names_a_dead_shard_and_a_missing_one() -> None:
    """A running shard whose heartbeat stopped is down, a shard of the layout with no record never ran;
    a cleanly stopped shard and a crashed one of an older layout are no reasons of their own."""
    now = 100_000_000
    fresh, old = now - 1_000_000, now - 60_000_000
    records = [
        ShardRecord("0/3", "r0", "host-a", 11, 0, fresh),
        ShardRecord("1/3", "r1", "host-b", 12, 0, old),
        ShardRecord("0/1", "r9", "host-a", 9, 0, old, "crashed", ("0/3",)),
        ShardRecord("0/2", "r8", "host-a", 8, 0, old, "stopped"),
    ]
    assert shard_reasons(records, now) == [
        "stream shard 1/3 is down: no heartbeat for 60s (pid 12 on host-b, run r1); "
        "its symbols are not recorded",
        "stream shard 1/2 has never run: its symbols are not recorded",
        "stream shard 2/3 has never run: its symbols are not recorded",
    ]


def test_a_crash_before_resharding_is_recorded_by_every_new_shard(settings: Settings) -> None:
    """The unsharded process crashed (the old heartbeat key says so); then shards 0/2 and 1/2 start:
    each learns of the crash once (its streams were out too), a third start learns nothing, and the
    dead process's records are gone once both took their share."""
    client = redis.Redis.from_url(settings.redis_url)
    client.set(keys.STREAMS_ALIVE, 1_000_000)
    client.hset(keys.CONNECTIONS, mapping={"spot-0": b"{}", "s1of2-spot-0": b"{}"})
    client.hset(keys.STREAMS_LOOP, "0/1", b"{}")

    async def start(shard: Shard) -> int | None:
        aclient = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            return await claim(aclient, Heartbeat(shard, f"r-{shard.index}"))
        finally:
            await aclient.aclose()

    assert asyncio.run(start(Shard(0, 2))) == 1_000_000
    record = ShardRecord.from_json("0/1", client.hget(keys.STREAM_SHARDS, "0/1") or b"")
    assert (record.state, record.taken_by) == ("crashed", ("0/2",))
    assert client.hkeys(keys.CONNECTIONS) == [b"s1of2-spot-0"]  # shard 1's own: it deletes them itself
    assert client.hkeys(keys.STREAMS_LOOP) == []
    assert asyncio.run(start(Shard(1, 2))) == 1_000_000
    assert set(client.hkeys(keys.STREAM_SHARDS)) == {b"0/2", b"1/2"} and client.hlen(keys.CONNECTIONS) == 0
    client.hset(keys.STREAM_SHARDS, "0/2", Heartbeat(Shard(0, 2), "r-0").record("stopped"))
    assert asyncio.run(start(Shard(0, 2))) is None


def test_a_start_that_fails_gives_the_shard_back_as_it_found_it(settings: Settings) -> None:
    """A start after a crash that cannot resolve its symbols (exchangeInfo down) exits 2 and leaves the
    crash recorded at its original time, for the next start to record; with no crash, `stopped`."""
    client = redis.Redis.from_url(settings.redis_url)
    env = {
        **os.environ,
        "SPOT_SYMBOLS": "ALL",
        "BINANCE_SPOT_REST_URL": f"http://127.0.0.1:{free_port()}/spot",
        "REST_MAX_RETRIES": "0",
    }
    client.hset(keys.STREAM_SHARDS, "1/2", ShardRecord("1/2", "r-dead", "h", 1, 0, 5_000_000).to_json())
    for shard in ("1/2", "0/2"):
        failed = subprocess.run(
            [COLLECTOR, "streams", "--shard", shard], capture_output=True, text=True, env=env
        )
        assert failed.returncode == 2 and "exchangeInfo" in failed.stderr, failed.stderr
    crashed = ShardRecord.from_json("1/2", client.hget(keys.STREAM_SHARDS, "1/2") or b"")
    assert (crashed.state, crashed.alive_us) == ("running", 5_000_000)
    assert ShardRecord.from_json("0/2", client.hget(keys.STREAM_SHARDS, "0/2") or b"").state == "stopped"


async def _no_snapshot(market: str, symbol: str) -> None:
    return None


def _env(settings: Settings, fake: FakeExchange) -> dict[str, str]:
    return collector_env(
        settings,
        fake,
        SPOT_SYMBOLS=SYMBOLS,
        FUTURES_SYMBOLS=SYMBOLS,
        OPEN_INTEREST_INTERVAL_S="3600",
        DEPTH_SNAPSHOT_INTERVAL_S="3600",
        ALERT_MIN_NOTIONAL_USD="1000000000",
        ALERT_WINDOW_NOTIONAL_USD="1000000000",
    )


def _shard(index: int, env: dict[str, str], log_dir: Path) -> Process:
    return Process(f"streams-{index}", [COLLECTOR, "streams", "--shard", f"{index}/2"], env, log_dir)


def _connected(client: redis.Redis) -> dict[str, str]:
    return {k.decode(): orjson.loads(v)["state"] for k, v in client.hgetall(keys.CONNECTIONS).items()}


def _messages(client: redis.Redis, symbol: str) -> int:
    fields = client.hgetall(keys.STREAM_MESSAGES)
    return sum(int(v) for k, v in fields.items() if k.decode().split(":", 1)[1].startswith(symbol.lower()))


def test_two_shards_and_two_workers_store_every_event_once(settings: Settings, tmp_path: Path) -> None:
    """Two stream shards and two Celery workers against the fake exchange: every event sent is stored
    once, `collector audit` balances for both shards' runs, a second process for a taken shard is
    refused, and a killed shard is named by /health while the other keeps recording."""
    init_db(settings)
    client = redis.Redis.from_url(settings.redis_url)
    with FakeExchange(
        rate=150, spot_symbols=SYMBOLS.split(","), futures_symbols=SYMBOLS.split(","), seed=3
    ) as fake:
        env = _env(settings, fake)
        processes = [
            _shard(0, env, tmp_path),
            _shard(1, env, tmp_path),
            celery_worker(env, tmp_path, name="worker1", concurrency=1),
            celery_worker(env, tmp_path, name="worker2", concurrency=1),
            celery_beat(env, tmp_path),
        ]
        try:
            # Shard 0: spot, futures /public and /market (with the market-wide streams); shard 1 the same
            # three families for its own two symbols: six connections, ids apart.
            wait_until(
                lambda: (
                    sorted(_connected(client).items())
                    == sorted(
                        (f"{prefix}{name}", "connected")
                        for prefix in ("s0of2-", "s1of2-")
                        for name in ("spot-0", "futures-public-0", "futures-market-0")
                    )
                ),
                60,
                "six connected connections, three per shard",
            )
            streams_of = {
                k.decode(): orjson.loads(v)["streams"] for k, v in client.hgetall(keys.CONNECTIONS).items()
            }
            assert "!forceOrder@arr" in streams_of["s0of2-futures-market-0"]
            assert all(
                name.startswith(("btcusdt", "adausdt"))
                for k, v in streams_of.items()
                if "s1of2" in k
                for name in v
            )
            wait_until(lambda: len(fake.ledger()["agg_trades"]) > 1500, 90, "traffic")
            fake.pause()

            def everything_stored() -> bool:
                ledger = fake.ledger()
                return all(len(_db_keys(settings, t)) >= len(ledger[t]) for t in DB_KEYS)

            wait_until(everything_stored, 120, "every sent event in PostgreSQL", interval_s=1)
            ledger = fake.ledger()
            for table in DB_KEYS:
                stored = _db_keys(settings, table)
                assert len(stored) == len(set(stored)), f"{table}: duplicates stored"
                assert sorted(stored) == sorted(_ledger_keys(ledger, table)), (
                    f"{table}: stored differ from sent"
                )
            assert {row[1] for row in _db_keys(settings, "agg_trades")} == set(SYMBOLS.split(","))
            audit = subprocess.run(
                [COLLECTOR, "audit"], capture_output=True, text=True, timeout=60, env=_path(env)
            )
            rows = [line.split() for line in audit.stdout.splitlines()[1:-1]]
            assert audit.stdout.splitlines()[-1] == "nothing lost", audit.stdout
            assert all(row[-1] == "balanced" for row in rows), audit.stdout
            assert {row[1].rsplit("-", 1)[1] for row in rows} == {"s0of2", "s1of2"}, audit.stdout

            # One process per shard: a second `--shard 1/2` sees the live heartbeat and refuses.
            duplicate = subprocess.run(
                [COLLECTOR, "streams", "--shard", "1/2"],
                capture_output=True,
                text=True,
                timeout=60,
                env=_path(env),
            )
            assert duplicate.returncode == 2, duplicate.stderr
            assert "stream shard 1/2 is already recorded by pid" in duplicate.stderr

            fake.resume()
            processes[1].signal_group(signal.SIGKILL)
            processes[1].stop()
            before = _messages(client, "ethusdt")
            wait_until(lambda: _messages(client, "ethusdt") > before + 100, 60, "shard 0 still recording")

            def shard_1_named_down() -> list[str]:
                report = assess(snapshot(settings, client, log_changes=False), now_us(), settings)
                return [r for r in report.reasons if r.startswith("stream shard 1/2 is down")]

            wait_until(shard_1_named_down, 30, "/health naming shard 1/2")
            assert not [
                r for r in assess(snapshot(settings, client), now_us(), settings).reasons if "0/2" in r
            ]
            snap = snapshot(settings, client, log_changes=False)
            status = format_status(snap, assess(snap, now_us(), settings), now_us())
            assert any(line.split()[:2] == ["1/2", "DOWN"] for line in status.splitlines()), status
            assert any(line.split()[:2] == ["0/2", "running"] for line in status.splitlines()), status
            exported = generate_latest(make_registry(lambda: snap)).decode()
            ages = {
                s.labels["shard"]: s.value
                for family in text_string_to_metric_families(exported)
                for s in family.samples
                if s.name == "collector_stream_shard_heartbeat_age_seconds"
            }
            assert ages["1/2"] > HEARTBEAT_STALE_S > ages["0/2"], ages

            # Restarted, shard 1 notices its own crash; shard 0 did not crash and says nothing of it.
            (tmp_path / "again").mkdir()
            processes[1] = _shard(1, env, tmp_path / "again")
            wait_until(
                lambda: "gaps.previous_run_crashed shard=1/2" in processes[1].log(), 60, "the crash noticed"
            )
            wait_until(lambda: not shard_1_named_down(), 30, "shard 1/2 beating again")
            assert "previous_run_crashed" not in processes[0].log()
        finally:
            codes = {p.name: p.stop() for p in processes}
    assert codes["streams-0"] == 0, processes[0].log()[-3000:]
    assert codes["streams-1"] == 0, processes[1].log()[-3000:]


def _path(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **env}
