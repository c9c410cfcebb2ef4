"""The stream process against the fake exchange and a real Redis: routing, completeness, faults, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from collector.binance.streams import connection_plans, table_for_stream
from collector.fake.server import FakeExchange
from collector.local.servers import LocalService, free_port, start_redis
from collector.queue import keys
from collector.queue.client import async_redis_client, redis_client
from collector.queue.envelope import make_envelope, parse_envelope
from collector.settings import Settings, load_settings
from collector.streams.connection import ConnectionOptions, StreamConnection
from collector.streams.ledger import GapLedger
from collector.streams.resync import snapshot_fetcher
from collector.streams.runner import StreamProcess, build
from collector.streams.runner import serve as serve_process
from collector.streams.sink import Sink, SinkOptions
from collector.streams.state import ConnectionState
from tests.conftest import FakeFactory
from tests.processes import TIMEOUT_FACTOR, stream_process, until, wait_until

STREAM_TABLES = ("agg_trades", "depth_updates", "mark_prices", "force_orders")
SHUTDOWN_FLUSH_S = 10.0


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeExchange]:
    with FakeExchange(rate=200.0) as exchange:
        yield exchange


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # keep a developer's .env out of the settings
    return tmp_path


def stream_settings(redis_url: str, fake: FakeExchange, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "binance_spot_ws_url": fake.spot_ws_url,
        "binance_futures_ws_url": fake.futures_ws_url,
        "stream_flush_interval_ms": 20,
        "ws_backoff_initial_s": 0.05,
        "ws_backoff_max_s": 0.5,
        "redis_socket_timeout_s": 2.0,
    }
    return load_settings(**(values | overrides))


def stream_env(redis_url: str, fake: FakeExchange, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "BINANCE_SPOT_WS_URL": fake.spot_ws_url,
        "BINANCE_FUTURES_WS_URL": fake.futures_ws_url,
        "WS_BACKOFF_INITIAL_S": "0.05",
        "WS_BACKOFF_MAX_S": "0.5",
        **extra,
    }


class InProcess:
    """The stream process's asyncio core on a thread of its own, so a test can watch its state."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: StreamProcess | None = None
        self.exit_code: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="streams")

    async def _main(self) -> None:
        client = async_redis_client(self.settings)
        sink = Sink(client, SinkOptions.from_settings(self.settings))
        options = ConnectionOptions.from_settings(self.settings)
        ledger = GapLedger(sink, snapshot_fetcher(self.settings, redis_client(self.settings)))
        self.process = build(connection_plans(self.settings), sink, options, ledger)
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        try:
            self.exit_code = await serve_process(self.process, self._stop, SHUTDOWN_FLUSH_S, client)
        finally:
            await client.aclose()

    @property
    def sink(self) -> Sink:
        assert self.process is not None
        return self.process.sink

    @property
    def connections(self) -> list[StreamConnection]:
        assert self.process is not None
        return self.process.connections

    def __enter__(self) -> InProcess:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> int | None:
        if self._thread.is_alive():
            assert self._loop is not None and self._stop is not None
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30 * TIMEOUT_FACTOR)
        assert not self._thread.is_alive(), "stream process did not stop"
        return self.exit_code

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def websocket_server(handler: Callable[[ServerConnection], Awaitable[None]]) -> Iterator[int]:
    """A `websockets` server on a free port in its own thread, running `handler` per connection."""
    port = free_port()
    ready, done = threading.Event(), threading.Event()

    async def server_main() -> None:
        async with serve(handler, "127.0.0.1", port):
            ready.set()
            while not done.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(server_main()))
    thread.start()
    try:
        assert ready.wait(10)
        yield port
    finally:
        done.set()
        thread.join(10)


def queued(client: redis.Redis, table: str) -> list[bytes]:
    return cast(list[bytes], client.lrange(keys.queue(table), 0, -1))


def total_queued(client: redis.Redis) -> int:
    return sum(int(client.llen(keys.queue(table))) for table in STREAM_TABLES)


def envelope_keys(table: str, envelope: bytes) -> list[tuple[Any, ...]]:
    """The natural keys the fake's ledger records for the events of one stored envelope."""
    parsed = orjson.loads(envelope)
    market, data = parsed["market"], parsed["frame"]["data"]
    if table == "agg_trades":
        return [(market, data["s"], data["a"], data["T"])]
    if table == "depth_updates":
        return [(market, data["s"], data["u"], data["E"])]
    if table == "mark_prices":
        return [(row["s"], row["E"]) for row in data if row.get("st", 1) == 1]
    if data.get("st", 1) != 1:
        return []  # the ledger leaves COIN-M liquidations out
    order = data["o"]
    return [(order["s"], order["S"], order["T"], order["p"], order["q"])]


def stored_keys(client: redis.Redis) -> dict[str, Counter[tuple[Any, ...]]]:
    return {
        table: Counter(key for envelope in queued(client, table) for key in envelope_keys(table, envelope))
        for table in STREAM_TABLES
    }


def ledger_keys(ledger: dict[str, Any]) -> dict[str, Counter[tuple[Any, ...]]]:
    return {table: Counter(tuple(key) for key in ledger[table]) for table in STREAM_TABLES}


def connection_states(client: redis.Redis) -> dict[str, dict[str, Any]]:
    states = cast(dict[bytes, bytes], client.hgetall(keys.CONNECTIONS))
    return {key.decode(): orjson.loads(value) for key, value in states.items()}


# The one line of a reconnect attempt: the disconnect or failed connect, with the attempt and its delay.
RECONNECT_LINE = re.compile(
    r"ws\.(?:disconnected|connect_failed) id=(\S+) .* attempt=(\d+) delay_s=([0-9.]+)"
)


def reconnect_attempts(text: str, connection_id: str | None = None) -> list[tuple[int, float]]:
    """(attempt, delay_s) of every reconnect attempt logged in `text`, of one connection if named."""
    return [
        (int(attempt), float(delay))
        for found_id, attempt, delay in RECONNECT_LINE.findall(text)
        if connection_id in (None, found_id)
    ]


def all_stored(client: redis.Redis, fake: FakeExchange) -> bool:
    """Whether every event the fake's ledger says it wrote is queued in Redis."""
    stored, sent = stored_keys(client), ledger_keys(fake.ledger())
    return all(set(stored[table]) >= set(sent[table]) for table in STREAM_TABLES)


# --- behaviour -----------------------------------------------------------------------------------


def test_events_of_every_table_land_in_their_lists_unmodified(
    redis_url: str, workdir: Path, fake: FakeExchange
) -> None:
    """Each table's list gets envelopes of its own streams, with the frame embedded byte for byte."""
    client = redis.Redis.from_url(redis_url)
    settings = stream_settings(redis_url, fake)
    planned = {(plan.market, name) for plan in connection_plans(settings) for name in plan.streams}
    started_us = time.time_ns() // 1000
    with InProcess(settings):
        wait_until(lambda: all(client.llen(keys.queue(t)) >= 3 for t in STREAM_TABLES), 30, "every table")
    finished_us = time.time_ns() // 1000
    ledger = ledger_keys(fake.ledger())
    for table in STREAM_TABLES:
        for envelope in queued(client, table):
            parsed = orjson.loads(envelope)
            market, received_at_us = parsed["market"], parsed["received_at_us"]
            frame = envelope[envelope.index(b',"frame":') + len(b',"frame":') : -1]
            audit = f',"run":"{parsed["run"]}","seq":{parsed["seq"]}'.encode()
            assert make_envelope(market, received_at_us, frame, audit=audit) == envelope  # frame untouched
            assert started_us <= received_at_us <= finished_us
            stream = parsed["frame"]["stream"]
            assert table_for_stream(stream) == table and (market, stream) in planned
            parse_envelope(table, envelope)  # the drain will be able to read it
            assert all(ledger[table][key] for key in envelope_keys(table, envelope))
    markets = {orjson.loads(e)["market"] for e in queued(client, "agg_trades")}
    assert markets == {"spot", "futures"}
    for table in STREAM_TABLES:  # numbered 1, 2, 3... per table within the run, in queue order
        numbers = [orjson.loads(e)["seq"] for e in queued(client, table)]
        assert numbers == list(range(1, len(numbers) + 1))
    stats = client.hgetall(keys.STREAM_MESSAGES)
    assert int(stats[keys.stream_field("spot", "btcusdt@aggTrade").encode()]) > 0
    assert client.hget(keys.STREAM_LAST_US, keys.stream_field("futures", "!markPrice@arr@1s"))


def test_redis_holds_exactly_the_ledger(redis_url: str, workdir: Path) -> None:
    """With a bounded fake, the events in Redis equal what the fake sent: same count, same keys, in order."""
    client = redis.Redis.from_url(redis_url)
    with FakeExchange(rate=2000.0, max_events=3000) as fake:
        with InProcess(stream_settings(redis_url, fake)):
            wait_until(lambda: fake.ledger()["data_frames_sent"] == 3000, 60, "the fake to send everything")
            wait_until(lambda: total_queued(client) == 3000, 30, "every frame in Redis")
        ledger = fake.ledger()
    assert stored_keys(client) == ledger_keys(ledger)
    for table, id_field in (("agg_trades", "a"), ("depth_updates", "u")):
        per_symbol: dict[tuple[str, str], list[int]] = {}
        for envelope in queued(client, table):
            parsed = orjson.loads(envelope)
            data = parsed["frame"]["data"]
            per_symbol.setdefault((parsed["market"], data["s"]), []).append(data[id_field])
        for ids in per_symbol.values():
            assert ids == sorted(ids)  # receive order kept within the list
    messages = client.hgetall(keys.STREAM_MESSAGES)
    assert sum(int(v) for v in messages.values()) == 3000
    counted = client.hgetall(keys.metric("messages"))
    assert sum(int(v) for v in counted.values()) == 3000


def test_rotation_replaces_connections_without_a_hole(
    redis_url: str, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Connections replaced make-before-break many times under load: every event sent is in Redis, none
    is lost, no outage is recorded, and depth updates repeated by the overlap are queued once."""
    caplog.set_level(logging.INFO, logger="collector.streams")
    client = redis.Redis.from_url(redis_url)
    with FakeExchange(rate=500.0, max_events=12000) as fake:
        with InProcess(stream_settings(redis_url, fake, ws_rotate_after_s=0.7)):
            wait_until(lambda: fake.ledger()["data_frames_sent"] == 12000, 60, "the fake to send everything")
            wait_until(lambda: all_stored(client, fake), 30, "every event sent queued")
        ledger = fake.ledger()
    assert caplog.text.count("reason=age") >= 6, "too few rotations to prove anything"
    assert reconnect_attempts(caplog.text) == []
    stored, sent = stored_keys(client), ledger_keys(ledger)
    for table in STREAM_TABLES:
        assert set(stored[table]) == set(sent[table]), f"{table}: lost or invented events"
    assert max(stored["depth_updates"].values()) == 1, "a depth update queued twice"
    outages = [orjson.loads(e)["frame"] for e in queued(client, "stream_gaps")]
    assert {o["cause"] for o in outages} <= {"shutdown"}
    assert queued(client, "depth_gaps") == []


def test_a_silent_busy_connection_is_noticed_in_seconds(
    redis_url: str, workdir: Path, fake: FakeExchange, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection that usually delivers many frames a second is closed after a few silent seconds,
    long before WS_IDLE_TIMEOUT_S, and the outage is recorded with cause `silence`."""
    caplog.set_level(logging.INFO, logger="collector.streams")
    client = redis.Redis.from_url(redis_url)
    settings = stream_settings(redis_url, fake, ws_idle_timeout_s=300, ws_silence_min_s=1)
    with InProcess(settings):
        wait_until(lambda: total_queued(client) > 600, 30, "enough frames to know the usual pace")
        fake.pause()
        paused = time.monotonic()
        wait_until(lambda: "cause=silence" in caplog.text, 20, "the silence watchdog")
        noticed_s = time.monotonic() - paused
        fake.resume()
        wait_until(lambda: client.hgetall(keys.metric("reconnects")), 30, "a reconnect")
    assert noticed_s < 10, noticed_s
    causes = {orjson.loads(e)["frame"]["cause"] for e in queued(client, "stream_gaps")}
    assert "silence" in causes


def test_malformed_frames_go_to_the_dead_letter_list(
    redis_url: str, workdir: Path, fake: FakeExchange
) -> None:
    """A frame that is not JSON is dead-lettered with its reason and the connection keeps delivering."""
    client = redis.Redis.from_url(redis_url)
    with InProcess(stream_settings(redis_url, fake)) as running:
        wait_until(lambda: total_queued(client) > 20, 30, "first events")
        fake.send_malformed(3)
        wait_until(lambda: client.llen(keys.DEADLETTER) == 3, 30, "three dead letters")
        after = total_queued(client)
        wait_until(lambda: total_queued(client) > after + 50, 30, "events after the dead letters")
        assert all(connection.state.reconnects == 0 for connection in running.connections)
    records = [orjson.loads(raw) for raw in client.lrange(keys.DEADLETTER, 0, -1)]
    for record in records:
        assert record["reason"] == "frame is not JSON" and record["source"] == "streams"
        assert record["frame"].startswith('{"stream":"') and record["market"] in ("spot", "futures")
        assert record["connection"] in {plan.connection_id for plan in connection_plans(running.settings)}
        assert record["received_at_us"] > 0
    assert int(client.hget(keys.metric("deadletters"), "streams") or 0) == 3
    assert fake.ledger()["malformed_sent"] == 3


def test_dropped_connections_reconnect_and_keep_delivering(
    redis_url: str, workdir: Path, fake: FakeExchange, caplog: pytest.LogCaptureFixture
) -> None:
    """When the exchange drops every connection, each reconnects, is counted, and events keep coming."""
    caplog.set_level(logging.INFO, logger="collector.streams")
    client = redis.Redis.from_url(redis_url)
    settings = stream_settings(redis_url, fake)
    ids = {plan.connection_id for plan in connection_plans(settings)}
    with InProcess(settings):
        wait_until(lambda: set(connection_states(client)) == ids, 30, "connection states in Redis")
        wait_until(lambda: total_queued(client) > 20, 30, "first events")
        assert fake.drop_connections() == len(ids)

        def reconnected() -> bool:
            counts = client.hgetall(keys.metric("reconnects"))
            states = connection_states(client)
            return all(
                int(counts.get(i.encode(), 0)) >= 1
                and states[i]["reconnects"] >= 1
                and states[i]["state"] == "connected"
                for i in ids
            )

        wait_until(reconnected, 30, "every connection reconnected")
        after = total_queued(client)
        wait_until(lambda: total_queued(client) > after + 50, 30, "events after the reconnect")
    text = caplog.text
    assert {attempt for attempt, _ in reconnect_attempts(text)} == {1}  # each followed delivered data
    assert text.count("ws.connected id=") >= 2 * len(ids)
    assert all(state["state"] == "stopped" for state in connection_states(client).values())


def test_each_reconnect_attempt_is_one_log_line(
    make_fake: FakeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Against the fake exchange (a drop, then the exchange down and back): every reconnect attempt is
    one log line naming its cause, its attempt number and its delay; every connect one line."""
    caplog.set_level(logging.INFO, logger="collector.streams")
    fake = make_fake(rate=100)
    port, stream = fake.port, "btcusdt@aggTrade"
    url = f"{fake.spot_ws_url}/stream?streams={stream}"
    state = ConnectionState("spot-0", "spot", "spot", url, (stream,))
    options = ConnectionOptions(
        open_timeout_s=2, idle_timeout_s=300, backoff_initial_s=0.05, backoff_max_s=0.4
    )
    frames: list[bytes] = []

    def counted(frame: bytes) -> None:
        frames.append(frame)
        state.messages += 1  # what the real handler counts: the backoff restarts after delivered data

    async def main() -> None:
        connection = StreamConnection(state, lambda source, notice: lambda f, at: counted(f), options)
        connection.start()
        await until(lambda: len(frames) > 5, 20, "first frames")
        assert await asyncio.to_thread(fake.drop_connections) == 1
        await until(lambda: state.reconnects == 1 and state.state == "connected", 20, "the reconnect")
        delivered = len(frames)
        await until(lambda: len(frames) > delivered + 5, 20, "frames after the reconnect")
        await asyncio.to_thread(fake.stop)  # closes with 1001, then refuses every connect
        await until(lambda: state.reconnects >= 5, 20, "refused attempts")
        await asyncio.to_thread(make_fake, rate=100, port=port)
        await until(lambda: state.state == "connected", 20, "the exchange back")
        await connection.stop()

    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "id=spot-0" in r.getMessage()]
    connects = [line for line in lines if line.startswith("ws.connected ")]
    attempts = [line for line in lines if RECONNECT_LINE.search(line)]
    assert len(connects) == 3, lines  # the first, after the drop, after the exchange came back
    assert len(attempts) == state.reconnects, lines
    # Connects, attempts and the last disconnect (stop: no attempt): nothing else for this connection.
    assert len(lines) == len(connects) + len(attempts) + 1, lines
    numbers = reconnect_attempts("\n".join(attempts))
    assert [n for n, _ in numbers] == [1, 1, *range(2, len(attempts))], lines  # 1 after delivered data
    assert all(delay <= min(0.4, 0.05 * 2 ** (n - 1)) + 0.005 for n, delay in numbers), lines
    assert all(re.search(r" (cause|error)=\S", line) for line in attempts), lines


def test_silent_connection_is_reopened_by_the_watchdog(
    redis_url: str, workdir: Path, fake: FakeExchange, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection that receives nothing for WS_IDLE_TIMEOUT_S is closed and opened again."""
    caplog.set_level(logging.INFO, logger="collector.streams")
    client = redis.Redis.from_url(redis_url)
    with InProcess(stream_settings(redis_url, fake, ws_idle_timeout_s=0.5)):
        wait_until(lambda: total_queued(client) > 10, 30, "first events")
        fake.pause()
        wait_until(lambda: "cause=silence" in caplog.text, 30, "the silence watchdog")
        wait_until(lambda: client.hgetall(keys.metric("reconnects")), 30, "a reconnect")
        fake.resume()
        after = total_queued(client)
        wait_until(lambda: total_queued(client) > after + 20, 30, "events after the watchdog")


def test_server_shutdown_notice_reconnects_at_once(
    redis_url: str, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spot `serverShutdown` notice opens the replacement first, then closes the old one: no gap."""
    caplog.set_level(logging.INFO, logger="collector.streams")
    trade = b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","s":"BTCUSDT","a":%d,"T":1}}'
    connections: list[int] = []

    async def announce_then_idle(ws: ServerConnection) -> None:
        if ws.request is None or not ws.request.path.startswith("/stream?"):
            await ws.wait_closed()  # the futures connection: silent
            return
        connections.append(len(connections) + 1)
        await ws.send(trade % len(connections), text=True)
        if len(connections) == 1:
            await ws.send(b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1}}', text=True)
        await ws.wait_closed()

    with websocket_server(announce_then_idle) as port:
        settings = load_settings(
            redis_url=redis_url,
            binance_spot_ws_url=f"ws://127.0.0.1:{port}",
            binance_futures_ws_url=f"ws://127.0.0.1:{port}",
            spot_symbols=["BTCUSDT"],
            spot_streams=["aggTrade"],
            futures_streams=["forceOrder"],
            ws_backoff_initial_s=60,  # a backoff would outlast the test
            stream_flush_interval_ms=20,
        )
        client = redis.Redis.from_url(redis_url)
        with InProcess(settings):
            wait_until(lambda: client.llen(keys.queue("agg_trades")) == 2, 20, "one trade per connection")
        assert "ws.server_shutdown id=spot-0" in caplog.text
        assert "ws.replaced id=spot-0 reason=server shutdown notice" in caplog.text
        assert reconnect_attempts(caplog.text, "spot-0") == []
        assert connections == [1, 2]
        # The spot stream never stopped receiving (the only outages are the final stop's).
        outages = [orjson.loads(e) for e in client.lrange(keys.queue("stream_gaps"), 0, -1)]
        assert {o["frame"]["cause"] for o in outages} == {"shutdown"}


def test_backoff_restarts_after_a_connection_that_delivered(
    redis_url: str, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that drops the connection right after sending data never pushes the reconnect delay up."""

    caplog.set_level(logging.INFO, logger="collector.streams")
    trade = b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","s":"BTCUSDT","a":%d,"T":1}}'
    served: list[int] = []

    async def send_one_then_drop(ws: ServerConnection) -> None:
        if ws.request is None or not ws.request.path.startswith("/stream?"):
            await ws.wait_closed()  # the futures connection: silent
            return
        served.append(1)
        await ws.send(trade % len(served), text=True)
        await ws.close(1001, "going away")

    with websocket_server(send_one_then_drop) as port:
        settings = load_settings(
            redis_url=redis_url,
            binance_spot_ws_url=f"ws://127.0.0.1:{port}",
            binance_futures_ws_url=f"ws://127.0.0.1:{port}",
            spot_symbols=["BTCUSDT"],
            spot_streams=["aggTrade"],
            futures_streams=["forceOrder"],
            ws_backoff_initial_s=0.2,
            ws_backoff_max_s=60,  # eight doublings would reach 25 s
            stream_flush_interval_ms=20,
        )
        with InProcess(settings):
            wait_until(lambda: len(served) >= 8, 20, "eight connections")
        attempts = reconnect_attempts(caplog.text, "spot-0")
        assert len(attempts) >= 7 and max(delay for _, delay in attempts) <= 0.2, attempts
        assert {attempt for attempt, _ in attempts} == {1}


def test_one_silent_stream_on_a_busy_connection_is_resubscribed(
    redis_url: str, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A depth stream that stops while its connection goes on is reported, resubscribed (paced, two
    messages), and its outage closes with its next event; the busy connection is never reopened."""
    caplog.set_level(logging.INFO, logger="collector.streams")
    depth = (
        b'{"stream":"btcusdt@depth@100ms",'
        b'"data":{"e":"depthUpdate","E":1,"s":"BTCUSDT","U":%d,"u":%d,"b":[],"a":[]}}'
    )
    trade = b'{"stream":"ethusdt@aggTrade","data":{"e":"aggTrade","s":"ETHUSDT","a":%d,"T":1}}'
    received: list[dict[str, Any]] = []

    async def depth_stops_until_resubscribed(ws: ServerConnection) -> None:
        if ws.request is None or not ws.request.path.startswith("/stream?"):
            await ws.wait_closed()  # the futures connection: silent
            return
        depth_on = asyncio.Event()
        depth_on.set()

        async def read_requests() -> None:
            async for message in ws:
                request = orjson.loads(message)
                received.append(request)
                await ws.send(orjson.dumps({"result": None, "id": request["id"]}).decode())
                if request["method"] == "SUBSCRIBE":
                    depth_on.set()

        reader = asyncio.create_task(read_requests())
        u = 0
        try:
            for i in range(1, 100_000):
                await ws.send((trade % i).decode())
                if depth_on.is_set():
                    u += 1
                    await ws.send((depth % (u, u)).decode())
                if i == 300:
                    depth_on.clear()  # the depth stream alone goes quiet
                await asyncio.sleep(0.005)
        except ConnectionClosed:
            pass
        finally:
            reader.cancel()

    with websocket_server(depth_stops_until_resubscribed) as port:
        settings = load_settings(
            redis_url=redis_url,
            binance_spot_ws_url=f"ws://127.0.0.1:{port}",
            binance_futures_ws_url=f"ws://127.0.0.1:{port}",
            spot_symbols=["BTCUSDT", "ETHUSDT"],
            spot_streams=["aggTrade", "depth@100ms"],
            futures_streams=["forceOrder"],
            ws_silence_min_s=1,
            stream_flush_interval_ms=20,
        )
        client = redis.Redis.from_url(redis_url)
        with InProcess(settings):
            wait_until(lambda: "gaps.stream_recovered connection=spot-0" in caplog.text, 30, "the recovery")
        assert "ws.stream_silent id=spot-0 stream=btcusdt@depth@100ms" in caplog.text
        assert reconnect_attempts(caplog.text, "spot-0") == [] and "cause=silence" not in caplog.text
        assert [(r["method"], r["params"]) for r in received] == [
            ("UNSUBSCRIBE", ["btcusdt@depth@100ms"]),
            ("SUBSCRIBE", ["btcusdt@depth@100ms"]),
        ]
        outages = [orjson.loads(e)["frame"] for e in client.lrange(keys.queue("stream_gaps"), 0, -1)]
        silenced = [o for o in outages if o["cause"] == "stream_silence"]
        assert [o["stream"] for o in silenced] == ["btcusdt@depth@100ms"] * 2  # opened, then closed
        assert silenced[-1]["ended_at_us"] > silenced[-1]["started_at_us"]


def test_nothing_is_lost_while_redis_is_down(
    workdir: Path, fake: FakeExchange, caplog: pytest.LogCaptureFixture
) -> None:
    """Events received while Redis is stopped stay buffered and all reach Redis once it is back."""
    caplog.set_level(logging.INFO, logger="collector.streams")
    port = free_port()
    server: LocalService = start_redis(workdir / "redis", port=port, persistent=True)
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        with InProcess(stream_settings(server.url, fake)) as running:
            wait_until(lambda: total_queued(client) > 50, 30, "first events")
            server.stop()
            wait_until(lambda: "sink.redis_unavailable" in caplog.text, 30, "the outage to be noticed")
            buffered = running.sink.buffered
            wait_until(lambda: running.sink.buffered > buffered + 100, 30, "events buffered meanwhile")
            server = start_redis(workdir / "redis", port=port, persistent=True)
            wait_until(lambda: "sink.redis_recovered" in caplog.text, 30, "the recovery")
            fake.pause()
            wait_until(lambda: all_stored(client, fake), 30, "every event sent queued")
        ledger = ledger_keys(fake.ledger())
        stored = stored_keys(client)
        for table in STREAM_TABLES:
            assert set(stored[table]) == set(ledger[table]), table  # nothing missing, nothing invented
        assert caplog.text.count("sink.redis_unavailable") == 1
    finally:
        server.stop()


def test_sigterm_flushes_everything_and_exits_zero(redis_url: str, workdir: Path, fake: FakeExchange) -> None:
    """`collector streams` as a real process: SIGTERM writes every received event to Redis and exits 0."""
    client = redis.Redis.from_url(redis_url)
    # Nothing is flushed on time or size, so what reaches Redis is the shutdown flush's doing.
    env = stream_env(redis_url, fake, STREAM_FLUSH_INTERVAL_MS="600000", STREAM_FLUSH_MAX_EVENTS="10000000")
    process = stream_process(env, workdir)
    try:

        def all_connections_fed() -> bool:
            ledger = fake.ledger()
            open_fed = [c for c in ledger["connections"] if c["open"] and c["data_frames"] > 20]
            return len(open_fed) == 3

        wait_until(all_connections_fed, 30, "three connections receiving")
        assert total_queued(client) == 0
        fake.pause()
        code = process.stop()
    finally:
        process.stop()
    assert code == 0, process.log()
    assert stored_keys(client) == ledger_keys(fake.ledger())
    assert all(state["state"] == "stopped" for state in connection_states(client).values())
    assert "Traceback" not in process.log()


def test_unreachable_redis_is_one_line_and_exit_code_2(workdir: Path) -> None:
    """A wrong REDIS_URL makes `collector streams` print one line naming Redis and exit 2."""
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "REDIS_SOCKET_TIMEOUT_S": "2"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "collector"), "streams"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_FACTOR,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("collector: Redis at redis://127.0.0.1:")
