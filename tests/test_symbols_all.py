"""`*_SYMBOLS=ALL` end to end: the real `collector streams` against the fake exchange while it lists and
delists symbols, the start-up failures, `collector trigger`, and the fake's own listing controls."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import websockets

from collector.fake.generators import synthetic_symbols
from collector.fake.server import FakeExchange
from collector.local.servers import free_port
from collector.queue import keys
from collector.queue.symbols import read_symbols, write_symbols
from collector.streams.silence import SilencePolicy
from tests.processes import TIMEOUT_FACTOR, Process, stream_process, wait_until
from tests.test_fake_exchange import quiet_while

COLLECTOR = str(Path(sys.executable).with_name("collector"))
# The fake also lists its recorded symbols: spot NKNUSDT (USDT), BLZETH, LRCBTC, RUNEEUR; USD-M
# AKROUSDT, CTKUSDT, KEEPUSDT, SUSHIUSDT.
SPOT_USDT_AT_START = ["NKNUSDT", "ZAAAUSDT", "ZAACUSDT", "ZAAEUSDT"]
FUTURES_AT_START = ["AKROUSDT", "CTKUSDT", "KEEPUSDT", "SUSHIUSDT", "ZAAAUSDT", "ZAABUSDC"]
SILENCE_MIN_S = 1


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # keep a developer's .env out of the settings
    return tmp_path


@pytest.fixture
def fake() -> Iterator[FakeExchange]:
    spot, futures = synthetic_symbols("spot", 6), synthetic_symbols("futures", 2)
    with FakeExchange(rate=100.0, spot_symbols=spot, futures_symbols=futures) as exchange:
        yield exchange


def all_env(redis_url: str, fake: FakeExchange, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "BINANCE_SPOT_WS_URL": fake.spot_ws_url,
        "BINANCE_FUTURES_WS_URL": fake.futures_ws_url,
        "BINANCE_SPOT_REST_URL": fake.spot_rest_url,
        "BINANCE_FUTURES_REST_URL": fake.futures_rest_url,
        "SPOT_SYMBOLS": "ALL",
        "FUTURES_SYMBOLS": "ALL",
        "SPOT_QUOTE_ASSETS": "USDT",
        "SYMBOLS_REFRESH_INTERVAL_S": "2",
        # 4 spot symbols x 2 streams fill two connections exactly: a new listing needs a new one.
        "WS_MAX_STREAMS_PER_CONNECTION": "4",
        "WS_SILENCE_MIN_S": str(SILENCE_MIN_S),
        "WS_BACKOFF_INITIAL_S": "0.05",
        "WS_BACKOFF_MAX_S": "0.5",
        "STREAM_FLUSH_INTERVAL_MS": "20",
        "REST_MAX_RETRIES": "0",
        **extra,
    }


def counts(client: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(keys.STREAM_MESSAGES).items()}


def frames(client: redis.Redis, table: str) -> list[dict[str, Any]]:
    """The queued envelopes' frames of `table`, oldest first (no drain runs in these tests)."""
    return [orjson.loads(raw)["frame"] for raw in client.lrange(keys.queue(table), 0, -1)]


def chain_breaks(client: redis.Redis, market: str, symbols: set[str]) -> list[str]:
    """Every place where a symbol's queued diff-depth chain does not link (spot U, futures pu)."""
    last: dict[str, int] = {}
    breaks = []
    for envelope_frame in (orjson.loads(raw) for raw in client.lrange(keys.queue("depth_updates"), 0, -1)):
        if envelope_frame["market"] != market:
            continue
        data = envelope_frame["frame"]["data"]
        symbol = data["s"]
        if symbol not in symbols:
            continue
        if symbol in last:
            links = data["pu"] == last[symbol] if market == "futures" else data["U"] == last[symbol] + 1
            if not links:
                breaks.append(f"{symbol}: u {last[symbol]} -> U {data['U']}")
        last[symbol] = data["u"]
    return breaks


def fake_streams(fake: FakeExchange) -> dict[int, set[str]]:
    """Every open connection of the fake and the streams it is subscribed to now, as `market:name`."""
    return {
        conn["id"]: {
            f"{'spot' if conn['path'].startswith('/spot') else 'futures'}:{name}" for name in conn["streams"]
        }
        for conn in fake.connections()
    }


def subscribed_now(fake: FakeExchange) -> set[str]:
    return {name for names in fake_streams(fake).values() for name in names}


DELISTED = ("spot:zaaausdt@", "futures:zaabusdc@")
DELISTED_DEPTH = {("spot", "ZAAAUSDT"), ("futures", "ZAABUSDC")}
# The stream process's watchdog looks every WS_SILENCE_MIN_S / 2, and may wait a control message's
# slot (0.5 s) to act: a silence past its limit is reported within this.
SILENCE_NOTICE_S = 1.0


def past_silence_limit(client: redis.Redis, streams: set[tuple[str, str]]) -> bool:
    """Whether every connection has received a frame later than each of these (market, symbol) depth
    streams' last frame plus its silence limit (as the stream process computes it from the stream's
    usual gap) and the time the watchdog takes to notice: were they watched, they would be silent."""
    received: dict[tuple[str, str], list[int]] = {stream: [] for stream in streams}
    for raw in client.lrange(keys.queue("depth_updates"), 0, -1):
        envelope = orjson.loads(raw)
        times = received.get((envelope["market"], envelope["frame"]["data"]["s"]))
        if times is not None:
            times.append(envelope["received_at_us"])
    due_us = 0
    for times in received.values():
        usual_gap_us = (times[-1] - times[0]) / (len(times) - 1)
        limit_us = SilencePolicy(SILENCE_MIN_S, idle_s=60).stream_limit_us(usual_gap_us)  # idle_s: unused
        due_us = max(due_us, times[-1] + int(limit_us + SILENCE_NOTICE_S * 1e6))
    records = [orjson.loads(v) for v in client.hgetall(keys.CONNECTIONS).values()]
    return all((r["last_message_us"] or 0) > due_us for r in records)


def test_listings_and_delistings_are_followed_without_a_restart(
    redis_url: str, fake: FakeExchange, workdir: Path
) -> None:
    """New listings are subscribed (a new connection once the others are full), delistings let go,
    and the unchanged symbols lose nothing: same sockets, counts rising, depth chains unbroken."""
    client = redis.Redis.from_url(redis_url)
    streams = stream_process(all_env(redis_url, fake), workdir)
    try:
        wait_until(lambda: read_symbols(client, "spot") == SPOT_USDT_AT_START, 30, "spot list published")
        assert read_symbols(client, "futures") == FUTURES_AT_START
        wait_until(lambda: len(fake.connections()) == 6, 30, "2 spot, 2 /public and 2 /market connections")
        # Long enough for every depth stream's silence watch to warm up (100 events each).
        wait_until(
            lambda: min((v for k, v in counts(client).items() if "@depth" in k), default=0) >= 100,
            60,
            "100 events on every depth stream",
        )
        before = fake_streams(fake)

        fake.delist_symbol("spot", "ZAAAUSDT")
        fake.delist_symbol("futures", "ZAABUSDC")
        for symbol in ("NEWAUSDT", "NEWBUSDT", "NEWCUSDT", "NEWDFDUSD"):
            fake.list_symbol("spot", symbol)
        fake.list_symbol("futures", "NEWEUSDT")

        spot_now = ["NEWAUSDT", "NEWBUSDT", "NEWCUSDT", "NKNUSDT", "ZAACUSDT", "ZAAEUSDT"]
        futures_now = ["AKROUSDT", "CTKUSDT", "KEEPUSDT", "NEWEUSDT", "SUSHIUSDT", "ZAAAUSDT"]
        wait_until(lambda: read_symbols(client, "spot") == spot_now, 30, "spot list refreshed")
        wait_until(lambda: read_symbols(client, "futures") == futures_now, 30, "futures list refreshed")
        new_streams = [
            f"spot:{s.lower()}@{t}"
            for s in ("NEWAUSDT", "NEWBUSDT", "NEWCUSDT")
            for t in ("aggTrade", "depth@100ms")
        ] + ["futures:neweusdt@aggTrade", "futures:neweusdt@depth@500ms"]
        wait_until(lambda: all(counts(client).get(n, 0) > 0 for n in new_streams), 30, "new streams flowing")
        wait_until(
            lambda: not any(name.startswith(DELISTED) for name in subscribed_now(fake)),
            30,
            "delisted streams unsubscribed",
        )
        assert not any("newdfdusd" in name for name in subscribed_now(fake))  # quoted in FDUSD

        # Nothing of the unchanged symbols was touched: their sockets stayed, their counts rise.
        after = fake_streams(fake)
        assert set(before) < set(after) and len(after) == len(before) + 1, (before, after)
        for connection_id, names in before.items():
            kept = {n for n in names if not n.startswith(DELISTED)}
            assert kept <= after[connection_id]
        unchanged = {name for name in counts(client) if not name.startswith(DELISTED) and "new" not in name}
        first = counts(client)
        wait_until(
            lambda: all(counts(client)[name] > first[name] for name in unchanged),
            10,
            "the unchanged streams' counts rising",
        )
        records = [orjson.loads(v) for v in client.hgetall(keys.CONNECTIONS).values()]
        assert {r["reconnects"] for r in records} == {0} and {r["state"] for r in records} == {"connected"}

        # Past the silence limit: the delisted streams are not reported silent, no gap is open.
        wait_until(
            lambda: past_silence_limit(client, DELISTED_DEPTH),
            30,
            "every connection receiving past the delisted depth streams' silence limit",
        )
        assert client.hgetall(keys.OPEN_GAPS) == {}
        assert frames(client, "depth_gaps") == []
        outages = frames(client, "stream_gaps")
        assert all(o["stream"] in ("zaaausdt@depth@100ms", "zaabusdc@depth@500ms") for o in outages), outages
        still_open = {o["stream"] for o in outages if o["ended_at_us"] is None} - {
            o["stream"] for o in outages if o["ended_at_us"] is not None
        }
        assert still_open == set()
        assert chain_breaks(client, "spot", {"NKNUSDT", "ZAACUSDT", "ZAAEUSDT"}) == []
        assert (
            chain_breaks(client, "futures", {"AKROUSDT", "CTKUSDT", "KEEPUSDT", "SUSHIUSDT", "ZAAAUSDT"})
            == []
        )

        # A refresh that fails keeps the current list and the connections.
        fake.fail_rest(500, count=2)
        wait_until(lambda: "symbols.refresh_failed" in streams.log(), 30, "the failed refresh logged")
        assert read_symbols(client, "spot") == spot_now and len(fake.connections()) == len(after)
    finally:
        code = streams.stop()
        client.close()
    log = streams.log()
    assert code == 0, log
    # One INFO line per refresh that changed a market (two, unless a refresh fell between the calls).
    totals = {"spot": [0, 0], "futures": [0, 0]}
    for line in log.splitlines():
        if "symbols.changed" in line:
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            totals[fields["market"]][0] += int(fields["added"])
            totals[fields["market"]][1] += int(fields["removed"])
    assert totals == {"spot": [3, 1], "futures": [1, 1]}
    assert "removed_symbols=ZAAAUSDT" in log and "added_symbols=NEWEUSDT" in log
    after_changes = log[log.rindex("symbols.changed") :]
    assert "stream=zaaausdt@depth@100ms" not in after_changes
    assert "stream=zaabusdc@depth@500ms" not in after_changes


def _streams_once(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COLLECTOR, "streams"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_FACTOR,
        cwd=cwd,
    )


def test_start_without_exchange_info_or_earlier_list_exits_2(redis_url: str, workdir: Path) -> None:
    """exchangeInfo unreachable at start and no list published before: one line, exit 2."""
    port = free_port()
    done = _streams_once(
        {
            "REDIS_URL": redis_url,
            "SPOT_SYMBOLS": "ALL",
            "BINANCE_SPOT_REST_URL": f"http://127.0.0.1:{port}",
            "REST_MAX_RETRIES": "0",
        },
        workdir,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "collector: SPOT_SYMBOLS=ALL needs exchangeInfo at start, and no earlier list is published: "
        f"GET http://127.0.0.1:{port}/api/v3/exchangeInfo:"
    ), done.stderr
    assert "Traceback" not in done.stderr


def test_start_without_exchange_info_uses_the_last_published_list(
    redis_url: str, fake: FakeExchange, workdir: Path
) -> None:
    """exchangeInfo unreachable at start, a list published by an earlier run: a WARNING, and it is used."""
    client = redis.Redis.from_url(redis_url)
    write_symbols(client, "spot", ["ZAACUSDT"])
    env = all_env(
        redis_url, fake, BINANCE_SPOT_REST_URL=f"http://127.0.0.1:{free_port()}", FUTURES_SYMBOLS="BTCUSDT"
    )
    streams = stream_process(env, workdir)
    try:
        wait_until(
            lambda: counts(client).get("spot:zaacusdt@aggTrade", 0) > 0, 30, "the known symbol recorded"
        )
        assert read_symbols(client, "futures") == ["BTCUSDT"]  # explicit lists are published too
    finally:
        code = streams.stop()
        client.close()
    assert code == 0
    assert "symbols.exchange_info_failed market=spot" in streams.log()
    assert "action=using the 1 symbols the last run published" in streams.log()


def test_quote_filter_matching_nothing_exits_2(redis_url: str, fake: FakeExchange, workdir: Path) -> None:
    """SPOT_QUOTE_ASSETS that no TRADING symbol has: one line naming the filter and what exists, exit 2."""
    done = _streams_once(all_env(redis_url, fake, SPOT_QUOTE_ASSETS="TRY"), workdir)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "collector: SPOT_QUOTE_ASSETS: TRY matches no TRADING symbol of "
        f"{fake.spot_rest_url}/api/v3/exchangeInfo (quote assets there: BTC, ETH, EUR, FDUSD, USDT)"
    )


def test_quote_filter_without_all_is_refused(workdir: Path) -> None:
    """SPOT_QUOTE_ASSETS with an explicit SPOT_SYMBOLS: one configuration line, exit 2."""
    done = _streams_once({"SPOT_SYMBOLS": "BTCUSDT", "SPOT_QUOTE_ASSETS": "USDT"}, workdir)
    assert done.returncode == 2
    assert done.stderr == (
        "collector: configuration error: SPOT_QUOTE_ASSETS: only applies with SPOT_SYMBOLS=ALL "
        "(got SPOT_SYMBOLS=BTCUSDT)\n"
    )


def test_trigger_checks_the_published_list_of_an_all_market(redis_url: str, workdir: Path) -> None:
    """`collector trigger --symbol` with ALL: refused before a list is published and for an unlisted
    symbol (one line, exit 2); accepted for a listed one."""
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url, "SPOT_SYMBOLS": "ALL"}

    def trigger(symbol: str) -> subprocess.CompletedProcess[str]:
        args = [COLLECTOR, "trigger", "depth-snapshot", "--market", "spot", "--symbol", symbol]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, cwd=workdir)

    none_yet = trigger("btcusdt")
    assert none_yet.returncode == 2
    assert none_yet.stderr == (
        "collector: trigger depth-snapshot: BTCUSDT is not a configured symbol "
        "(SPOT_SYMBOLS=ALL and `collector streams` has published no list yet)\n"
    )
    client = redis.Redis.from_url(redis_url)
    write_symbols(client, "spot", ["ETHUSDT", "BTCUSDT"])
    client.close()
    unlisted = trigger("dogeusdt")
    assert unlisted.returncode == 2
    assert unlisted.stderr == (
        "collector: trigger depth-snapshot: DOGEUSDT is not a configured symbol "
        "(SPOT_SYMBOLS=ALL, now: BTCUSDT, ETHUSDT)\n"
    )
    listed = trigger("btcusdt")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("sent collector.tasks.rest.depth_snapshot")


def _exchange_info(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=10 * TIMEOUT_FACTOR) as response:
        return {row["symbol"]: row["status"] for row in json.loads(response.read())["symbols"]}


async def _recv(ws: websockets.ClientConnection) -> None:
    async with asyncio.timeout(10 * TIMEOUT_FACTOR):
        await ws.recv()


def test_fake_lists_and_delists_at_runtime() -> None:
    """The fake's controls: a delisted symbol's streams stop and exchangeInfo calls it BREAK/SETTLING;
    a newly listed one starts sending, also on a subscription made before it was listed."""
    with FakeExchange(rate=50.0, spot_symbols=["BTCUSDT"], futures_symbols=["ETHUSDT"]) as fake:

        async def scenario() -> None:
            url = f"{fake.spot_ws_url}/stream?streams=btcusdt@aggTrade/newxusdt@aggTrade"
            other_url = f"{fake.futures_ws_url}/market/stream?streams=ethusdt@aggTrade"
            async with websockets.connect(url, ping_interval=None) as ws:
                await _recv(ws)
                received = 1
                await asyncio.to_thread(fake.delist_symbol, "spot", "BTCUSDT")
                [record] = (await asyncio.to_thread(fake.ledger))["connections"]
                while received < record["data_frames"]:  # what was written before the delisting
                    await _recv(ws)
                    received += 1
                async with websockets.connect(other_url, ping_interval=None) as other:
                    await quiet_while([ws], other, 35)  # 0.7 s at 50 a second
                await asyncio.to_thread(fake.list_symbol, "spot", "NEWXUSDT")
                await _recv(ws)

        asyncio.run(scenario())
        assert _exchange_info(fake.spot_rest_url + "/api/v3/exchangeInfo")["BTCUSDT"] == "BREAK"
        trading = _exchange_info(fake.spot_rest_url + "/api/v3/exchangeInfo?symbolStatus=TRADING")
        assert "BTCUSDT" not in trading and trading["NEWXUSDT"] == "TRADING"
        assert fake.delist_symbol("futures", "ETHUSDT") and not fake.delist_symbol("futures", "ETHUSDT")
        assert _exchange_info(fake.futures_rest_url + "/fapi/v1/exchangeInfo")["ETHUSDT"] == "SETTLING"
        request = urllib.request.Request(
            fake.control_url + "/list?market=futures&symbol=ethusdt", method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read()) == {"ok": True, "changed": True}
        assert _exchange_info(fake.futures_rest_url + "/fapi/v1/exchangeInfo")["ETHUSDT"] == "TRADING"


def test_fake_runs_with_many_symbols(workdir: Path) -> None:
    """`collector fake-exchange --spot-symbol-count 1500 --futures-symbol-count 500` lists them all."""
    port = free_port()
    args = [
        COLLECTOR,
        "fake-exchange",
        "--port",
        str(port),
        "--spot-symbol-count",
        "1500",
        "--futures-symbol-count",
        "500",
    ]
    process = Process("fake", args, {}, workdir)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: "listening" in process.log(), 30, "the fake listening")
        spot = _exchange_info(base + "/spot/api/v3/exchangeInfo?symbolStatus=TRADING")
        futures = _exchange_info(base + "/futures/fapi/v1/exchangeInfo")
        assert sum(s.startswith("Z") for s in spot) == 1500
        assert sum(s.startswith("Z") and v == "TRADING" for s, v in futures.items()) == 500
    finally:
        process.stop()
