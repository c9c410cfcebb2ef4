"""The fake Binance exchange, tested with real clients (websockets, urllib, aiohttp) on localhost."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import websockets

from collector.fake.generators import ForceOrders, MarkPrices
from collector.fake.names import PathFamily, parse_stream
from collector.fake.server import FakeExchange
from tests.conftest import FakeFactory
from tests.processes import until

TIMEOUT_FACTOR = float(os.environ.get("TIMEOUT_FACTOR", "1"))
SILENCE_S = 2.0  # how long a silent stream must stay silent


def deadline(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON body) of one request; HTTP errors are answers too."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=deadline(10)) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


async def recv_json(ws: websockets.ClientConnection, timeout: float = 10.0) -> Any:
    # asyncio.timeout, not wait_for: no task per frame, so a queued frame returns at once.
    async with asyncio.timeout(deadline(timeout)):
        return json.loads(await ws.recv())


async def recv_until_quiet(ws: websockets.ClientConnection, quiet_s: float) -> list[str]:
    """Every frame until none arrives for `quiet_s`: for a test that checks nothing comes over a
    period. To read what the fake has written, `recv_written` needs no period."""
    frames: list[str] = []
    while True:
        try:
            async with asyncio.timeout(quiet_s * TIMEOUT_FACTOR):
                frames.append(str(await ws.recv()))
        except TimeoutError:
            return frames


_barrier_ids = itertools.count(1_000_000)  # far from the ids the tests send themselves


async def recv_written(ws: websockets.ClientConnection) -> list[str]:
    """Every frame the server wrote to `ws` before it got a request sent now (its reply left out).

    The fake writes the reply on the same socket behind them, so the reply proves they have all
    arrived, with no quiet period to wait out. Once the fake has stopped writing (paused, or its
    max_events written: `written`), that is everything. Tests drain a connection before closing it:
    a websockets client stops reading when its queue is full, so a close frame queued behind a
    full-speed flood would only arrive after close_timeout.
    """
    request_id = next(_barrier_ids)
    await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": request_id}))
    frames: list[str] = []
    while True:
        async with asyncio.timeout(deadline(10)):
            frame = str(await ws.recv())
        try:
            message = json.loads(frame)
        except ValueError:
            message = None  # a malformed frame sent on purpose
        if isinstance(message, dict) and message.get("id") == request_id and "stream" not in message:
            return frames
        frames.append(frame)


async def written(fake: FakeExchange, count: int) -> None:
    """Wait until the fake has written `count` data frames in all (its max_events, say)."""
    await until(lambda: fake.ledger()["data_frames_sent"] >= count, 10, f"{count} frames written")


async def quiet_while(
    sockets: list[websockets.ClientConnection], witness: websockets.ClientConnection, frames: int
) -> None:
    """Assert that none of `sockets` receives anything while `witness` receives `frames` frames.

    The fake paces each connection alike, so the witness's frames measure the quiet period by what
    the fake demonstrably produced meanwhile, not by the test's clock. Cancelling recv() loses no
    frame (websockets' documentation).
    """
    late = [asyncio.create_task(ws.recv()) for ws in sockets]
    for _ in range(frames):
        await recv_json(witness)
    assert not any(task.done() for task in late), [task.result() for task in late if task.done()]
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)


async def request_reply(ws: websockets.ClientConnection, request: dict[str, Any]) -> tuple[Any, list[Any]]:
    """Send a JSON request; its reply, and the data frames that arrived before it."""
    await ws.send(json.dumps(request))
    before: list[Any] = []
    while True:
        message = await recv_json(ws)
        if isinstance(message, dict) and message.get("id") == request["id"] and "stream" not in message:
            return message, before
        before.append(message)


def check_chain(market: str, events: list[dict[str, Any]]) -> None:
    for prev, event in itertools.pairwise(events):
        if market == "spot":
            assert event["U"] == prev["u"] + 1, (prev, event)
        else:
            assert event["pu"] == prev["u"], (prev, event)
        assert event["u"] >= event["U"]


def test_spot_combined_envelope_and_payload_formats(make_fake: FakeFactory) -> None:
    """Spot frames are Binance combined-stream envelopes with Binance's aggTrade/depthUpdate fields."""
    fake = make_fake(rate=400)
    names = ["btcusdt@aggTrade", "btcusdt@depth@100ms", "nknusdt@depth", "nknusdt@aggTrade"]

    async def run() -> dict[str, list[dict[str, Any]]]:
        seen: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        async with websockets.connect(f"{fake.spot_ws_url}/stream?streams={'/'.join(names)}") as ws:
            while min(len(v) for v in seen.values()) < 3:
                frame = await recv_json(ws)
                assert set(frame) == {"stream", "data"}
                seen[frame["stream"]].append(frame["data"])
            await asyncio.to_thread(fake.pause)
            await recv_written(ws)  # a close queued behind unread frames would wait for close_timeout
        return seen

    seen = asyncio.run(run())
    for name in ("btcusdt@aggTrade", "nknusdt@aggTrade"):
        for trade in seen[name]:
            assert trade["e"] == "aggTrade" and trade["s"] == name.split("@")[0].upper()
            assert {"E", "a", "p", "q", "f", "l", "T", "m", "M"} <= set(trade)
            assert isinstance(trade["p"], str) and isinstance(trade["q"], str) and float(trade["p"]) > 0
            assert trade["T"] <= trade["E"] and trade["f"] <= trade["l"]
    for name in ("btcusdt@depth@100ms", "nknusdt@depth"):
        for diff in seen[name]:
            assert diff["e"] == "depthUpdate" and {"E", "s", "U", "u", "b", "a"} <= set(diff)
            assert "pu" not in diff and "T" not in diff  # spot diffs have neither (binance.md §3.3)
            for price, qty in diff["b"] + diff["a"]:
                assert isinstance(price, str) and isinstance(qty, str)


def test_futures_payloads_carry_current_fields(make_fake: FakeFactory) -> None:
    """USD-M depth has T and pu; aggTrade has nq and st:1; per-symbol markPrice has ap and st."""
    fake = make_fake(rate=400)

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        public = f"{fake.futures_ws_url}/public/stream?streams=btcusdt@depth@500ms/sushiusdt@depth@100ms"
        names = "btcusdt@aggTrade/ctkusdt@aggTrade/ethusdt@markPrice@1s"
        market = f"{fake.futures_ws_url}/market/stream?streams={names}"
        async with websockets.connect(public) as ws_public, websockets.connect(market) as ws_market:
            depth = [await recv_json(ws_public) for _ in range(10)]
            other = [await recv_json(ws_market) for _ in range(10)]
            await asyncio.to_thread(fake.pause)
            await asyncio.gather(recv_written(ws_public), recv_written(ws_market))
        return depth, other

    depth, other = asyncio.run(run())
    for frame in depth:
        diff = frame["data"]
        assert {"e", "E", "T", "s", "U", "u", "pu", "b", "a", "st"} <= set(diff) and diff["st"] == 1
        assert diff["T"] <= diff["E"]
    kinds = {frame["data"]["e"] for frame in other}
    assert kinds == {"aggTrade", "markPriceUpdate"}
    for frame in other:
        data = frame["data"]
        assert data["st"] == 1
        if data["e"] == "aggTrade":
            assert "nq" in data and "M" not in data and data["T"] <= data["E"]
        else:
            assert frame["stream"] == "ethusdt@markPrice@1s" and data["ap"] == data["p"]


def test_depth_chains_and_trade_ids_stay_valid_across_replay_loops(make_fake: FakeFactory) -> None:
    """Replayed recordings loop with shifted ids: chains and aggTrade ids stay valid across seams."""
    spot_names = "blzeth@depth/runeeur@depth@100ms/btcusdt@depth@100ms/nknusdt@aggTrade/btcusdt@aggTrade"
    futures_names = "keepusdt@depth@100ms/btcusdt@depth"

    def collect(path: str, count: int) -> list[dict[str, Any]]:
        fake = make_fake(rate=0, max_events=count)  # full speed, then silence

        async def run() -> list[dict[str, Any]]:
            base = fake.spot_ws_url if path.startswith("/stream") else fake.futures_ws_url
            async with websockets.connect(base + path) as ws:
                await written(fake, count)
                return [json.loads(frame) for frame in await recv_written(ws)]

        frames = asyncio.run(run())
        assert len(frames) == count
        return frames

    spot = collect(f"/stream?streams={spot_names}", 1500)
    public = collect(f"/public/stream?streams={futures_names}", 700)
    market = collect("/market/stream?streams=keepusdt@aggTrade", 30)
    for market_name, frames in (("spot", spot), ("futures", public), ("futures", market)):
        by_stream: dict[str, list[dict[str, Any]]] = {}
        for frame in frames:
            by_stream.setdefault(frame["stream"], []).append(frame["data"])
        for stream, events in by_stream.items():
            if "@depth" in stream:
                check_chain(market_name, events)
            else:
                for prev, trade in itertools.pairwise(events):
                    assert trade["a"] == prev["a"] + 1 and trade["f"] == prev["l"] + 1, (stream, prev, trade)
    # The recorded loops are short (RUNEEUR 1 diff, BLZETH 9, KEEPUSDT 132): seams were crossed.
    assert sum(1 for f in spot if f["stream"] == "blzeth@depth") > 30
    assert sum(1 for f in public if f["stream"] == "keepusdt@depth@100ms") > 300


def sync_and_compare(fake: FakeExchange, market: str, symbols: list[str]) -> None:
    """Sync a local book per binance.md §5 from stream + snapshot, then compare with a later snapshot."""
    rest = (
        f"{fake.spot_rest_url}/api/v3/depth?limit=1000&symbol="
        if market == "spot"
        else f"{fake.futures_rest_url}/fapi/v1/depth?limit=1000&symbol="
    )
    streams = "/".join(f"{s.lower()}@depth@100ms" for s in symbols)
    url = (
        f"{fake.spot_ws_url}/stream?streams={streams}"
        if market == "spot"
        else f"{fake.futures_ws_url}/public/stream?streams={streams}"
    )

    async def run() -> None:
        buffered: dict[str, list[dict[str, Any]]] = {s: [] for s in symbols}
        async with websockets.connect(url) as ws:

            async def receive_until(predicate: Callable[[], bool]) -> None:
                while not predicate():
                    data = (await recv_json(ws))["data"]
                    buffered[data["s"]].append(data)

            await receive_until(lambda: all(len(v) >= 3 for v in buffered.values()))
            snapshots = {s: (await asyncio.to_thread(http, "GET", rest + s))[2] for s in symbols}
            await receive_until(lambda: all(len(v) >= 40 for v in buffered.values()))
            await asyncio.to_thread(fake.pause)
            for frame in await recv_written(ws):
                data = json.loads(frame)["data"]
                buffered[data["s"]].append(data)
        for symbol in symbols:
            snapshot, events = snapshots[symbol], buffered[symbol]
            last_id = snapshot["lastUpdateId"]
            assert events[0]["U"] <= last_id + 1  # the snapshot is not older than the stream
            if market == "spot":
                live = [e for e in events if e["u"] > last_id]
                assert live[0]["U"] <= last_id + 1 <= live[0]["u"]
            else:
                live = [e for e in events if e["u"] >= last_id]
                assert live[0]["U"] <= last_id <= live[0]["u"]
            check_chain(market, live)
            book = {"b": dict(snapshot["bids"]), "a": dict(snapshot["asks"])}
            for event in live:
                for side in ("b", "a"):
                    for price, qty in event[side]:
                        if float(qty) == 0:
                            book[side].pop(price, None)
                        else:
                            book[side][price] = qty
            later = http("GET", rest + symbol)[2]
            assert later["lastUpdateId"] == live[-1]["u"]
            bids = sorted(book["b"].items(), key=lambda level: -float(level[0]))[:50]
            asks = sorted(book["a"].items(), key=lambda level: float(level[0]))[:50]
            assert [list(level) for level in bids] == later["bids"][:50]
            assert [list(level) for level in asks] == later["asks"][:50]

    asyncio.run(run())


def test_spot_snapshot_is_consistent_with_the_diff_stream(make_fake: FakeFactory) -> None:
    """A spot book synced per binance.md §5.1 (recorded and generated symbols) matches later snapshots."""
    sync_and_compare(make_fake(rate=400), "spot", ["NKNUSDT", "LRCBTC", "BTCUSDT"])


def test_futures_snapshot_is_consistent_with_the_diff_stream(make_fake: FakeFactory) -> None:
    """A USD-M book synced per binance.md §5.2 (incl. u == lastUpdateId) matches later snapshots."""
    sync_and_compare(make_fake(rate=400), "futures", ["SUSHIUSDT", "AKROUSDT", "ETHUSDT"])


def test_wrong_paths_and_bad_names_are_acknowledged_then_silent(make_fake: FakeFactory) -> None:
    """Like Binance, wrong-path streams and bad names get a SUBSCRIBE ack and then no data at all."""
    fake = make_fake(rate=500)
    witness_url = f"{fake.spot_ws_url}/stream?streams=btcusdt@aggTrade"  # a stream that is served
    silent = {
        f"{fake.futures_ws_url}/public/stream": ["btcusdt@aggTrade", "!markPrice@arr@1s", "!forceOrder@arr"],
        f"{fake.futures_ws_url}/market/stream": ["btcusdt@depth", "markPrice@arr@1s", "forceOrder@arr"],
        f"{fake.futures_ws_url}/stream": ["btcusdt@depth", "btcusdt@aggTrade", "!markPrice@arr@1s"],
        f"{fake.spot_ws_url}/stream": ["BTCUSDT@aggTrade", "btcusdt@depth@500ms", "xyzusdt@aggTrade"],
    }

    async def probe(
        stack: contextlib.AsyncExitStack, base: str, names: list[str], via_url: bool
    ) -> websockets.ClientConnection:
        url = f"{base}?streams={'/'.join(names)}" if via_url else base
        ws = await stack.enter_async_context(websockets.connect(url))
        if not via_url:
            reply, _ = await request_reply(ws, {"method": "SUBSCRIBE", "params": names, "id": 7})
            assert reply == {"result": None, "id": 7}
        listed, _ = await request_reply(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 8})
        assert listed["result"] == names
        return ws

    async def run() -> None:
        async with contextlib.AsyncExitStack() as stack:
            probes = await asyncio.gather(
                *(probe(stack, base, names, via) for base, names in silent.items() for via in (True, False))
            )
            witness = await stack.enter_async_context(websockets.connect(witness_url))
            await quiet_while(probes, witness, int(SILENCE_S * 500))  # SILENCE_S at the fake's rate
            await asyncio.to_thread(fake.pause)
            await recv_written(witness)

    asyncio.run(run())
    ledger = fake.ledger()
    # The witness, opened last, got every data frame sent; the 8 probes none.
    [witness] = [c for c in ledger["connections"] if c["data_frames"] > 0]
    assert witness["id"] == max(c["id"] for c in ledger["connections"]) and len(ledger["connections"]) == 9
    assert ledger["data_frames_sent"] == witness["data_frames"]


def test_live_subscribe_unsubscribe_and_list(make_fake: FakeFactory) -> None:
    """SUBSCRIBE starts data on an empty connection, LIST shows it, UNSUBSCRIBE stops it."""
    fake = make_fake(rate=200)

    async def run() -> None:
        async with websockets.connect(f"{fake.futures_ws_url}/market/stream") as ws:
            reply, _ = await request_reply(
                ws, {"method": "SUBSCRIBE", "params": ["btcusdt@aggTrade"], "id": 1}
            )
            assert reply == {"result": None, "id": 1}
            frame = await recv_json(ws)
            assert frame["stream"] == "btcusdt@aggTrade"
            listed, _ = await request_reply(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 2})
            assert listed == {"result": ["btcusdt@aggTrade"], "id": 2}
            reply, _ = await request_reply(
                ws, {"method": "UNSUBSCRIBE", "params": ["btcusdt@aggTrade"], "id": 3}
            )
            assert reply == {"result": None, "id": 3}  # frames written before it were read with it
            witness_url = f"{fake.futures_ws_url}/market/stream?streams=btcusdt@aggTrade"
            async with websockets.connect(witness_url) as witness:
                await quiet_while([ws], witness, 100)  # 0.5 s at 200 a second
                await asyncio.to_thread(fake.pause)
                await recv_written(witness)

    asyncio.run(run())


def test_1024_streams_per_connection_and_the_1025th_closes_it(make_fake: FakeFactory) -> None:
    """1024 streams in one URL are served; one more by SUBSCRIBE gets error 4 and a 1008 close."""
    symbols = [f"S{i}USDT" for i in range(512)]
    fake = make_fake(rate=20, spot_symbols=symbols)
    names = [f"{s.lower()}@{kind}" for s in symbols for kind in ("aggTrade", "depth")]

    async def run() -> tuple[Any, int | None]:
        async with websockets.connect(f"{fake.spot_ws_url}/stream?streams={'/'.join(names)}") as ws:
            assert (await recv_json(ws))["stream"] in names
            reply, _ = await request_reply(
                ws, {"method": "SUBSCRIBE", "params": ["btcusdt@aggTrade"], "id": 9}
            )
            with pytest.raises(websockets.ConnectionClosedError):
                while True:
                    await recv_json(ws)
            return reply, ws.close_code

    reply, code = asyncio.run(run())
    assert reply == {"error": {"code": 4, "msg": "Too many subscriptions"}, "id": 9}
    assert code == 1008


def test_ledger_lists_exactly_what_clients_received_with_max_events(make_fake: FakeFactory) -> None:
    """With max_events, the ledger's keys and counts equal what two clients received in total."""
    fake = make_fake(rate=0, max_events=600)
    spot_url = f"{fake.spot_ws_url}/stream?streams=btcusdt@aggTrade/nknusdt@depth@100ms/ethusdt@depth"
    market_url = (
        f"{fake.futures_ws_url}/market/stream?streams=ethusdt@aggTrade/!markPrice@arr@1s/!forceOrder@arr"
        "/sushiusdt@aggTrade"
    )

    async def run() -> list[list[str]]:
        fake.pause()  # both clients are open before the first of the 600 frames is written
        async with websockets.connect(spot_url) as spot, websockets.connect(market_url) as market:
            await asyncio.to_thread(fake.resume)
            await written(fake, 600)
            return [await recv_written(spot), await recv_written(market)]

    spot_frames, market_frames = asyncio.run(run())
    assert len(spot_frames) + len(market_frames) == 600
    agg, depth, marks, forces = set(), set(), set(), set()
    coin_m_rows = coin_m_forces = 0
    for market, frames in (("spot", spot_frames), ("futures", market_frames)):
        for frame in frames:
            data = json.loads(frame)["data"]
            if isinstance(data, list):
                marks |= {(r["s"], r["E"]) for r in data if r["st"] == 1}
                coin_m_rows += sum(1 for r in data if r["st"] == 2)
            elif data["e"] == "aggTrade":
                agg.add((market, data["s"], data["a"], data["T"]))
            elif data["e"] == "depthUpdate":
                depth.add((market, data["s"], data["u"], data["E"]))
            elif data["st"] == 1:
                o = data["o"]
                forces.add((o["s"], o["S"], o["T"], o["p"], o["q"]))
            else:
                coin_m_forces += 1
    ledger = fake.ledger()
    assert ledger["data_frames_sent"] == 600
    assert {tuple(k) for k in ledger["agg_trades"]} == agg and len(ledger["agg_trades"]) == len(agg)
    assert {tuple(k) for k in ledger["depth_updates"]} == depth
    assert {tuple(k) for k in ledger["mark_prices"]} == marks and len(ledger["mark_prices"]) == len(marks)
    assert {tuple(k) for k in ledger["force_orders"]} == forces
    assert ledger["coin_m_rows"] == coin_m_rows and ledger["coin_m_force_orders"] == coin_m_forces
    assert sum(c["data_frames"] for c in ledger["connections"]) == 600


def test_all_market_stream_on_two_connections_is_ledgered_once(make_fake: FakeFactory) -> None:
    """Two connections on !markPrice@arr get the same frames; the ledger lists each key once."""
    fake = make_fake(rate=100, max_events=4)
    fake.pause()
    url = f"{fake.futures_ws_url}/market/stream?streams=!markPrice@arr@1s"

    async def run() -> list[list[str]]:
        async with websockets.connect(url) as first, websockets.connect(url) as second:
            await request_reply(first, {"method": "LIST_SUBSCRIPTIONS", "id": 1})
            await request_reply(second, {"method": "LIST_SUBSCRIPTIONS", "id": 1})
            await asyncio.to_thread(fake.resume)
            await written(fake, 4)
            return [await recv_written(first), await recv_written(second)]

    first, second = asyncio.run(run())
    assert len(first) == len(second) == 2 and sorted(first) == sorted(second)  # the same two frames
    keys = {(r["s"], r["E"]) for f in first for r in json.loads(f)["data"] if r["st"] == 1}
    ledger = fake.ledger()
    assert ledger["data_frames_sent"] == 4
    assert {tuple(k) for k in ledger["mark_prices"]} == keys and len(ledger["mark_prices"]) == len(keys)


def test_two_connections_on_one_depth_stream_see_the_same_valid_chain(make_fake: FakeFactory) -> None:
    """Like Binance, every connection carrying a stream gets the same events, so both chains hold."""
    fake = make_fake(rate=300)
    url = f"{fake.futures_ws_url}/public/stream?streams=btcusdt@depth@100ms/sushiusdt@depth"

    async def run() -> list[list[dict[str, Any]]]:
        async with websockets.connect(url) as first, websockets.connect(url) as second:
            got: list[list[dict[str, Any]]] = []
            for ws in (first, second):
                got.append([(await recv_json(ws))["data"] for _ in range(60)])
            await asyncio.to_thread(fake.pause)
            await asyncio.gather(recv_written(first), recv_written(second))
            return got

    first, second = asyncio.run(run())
    for events in (first, second):
        for symbol in ("BTCUSDT", "SUSHIUSDT"):
            check_chain("futures", [e for e in events if e["s"] == symbol])
    assert {(e["s"], e["u"]) for e in first} & {(e["s"], e["u"]) for e in second}


def test_mark_price_array_has_every_contract_and_coin_m_rows(make_fake: FakeFactory) -> None:
    """!markPrice@arr@1s sends a JSON array per second: all USD-M rows, 2 COIN-M rows, one delisted row."""
    fake = make_fake(rate=10, futures_symbols=["BTCUSDT", "ETHUSDT", "SOLUSDT"])

    async def run() -> list[tuple[float, Any]]:
        url = f"{fake.futures_ws_url}/market/stream?streams=!markPrice@arr@1s"
        async with websockets.connect(url) as ws:
            frames = []
            for _ in range(2):
                frame = await recv_json(ws)
                frames.append((time.monotonic(), frame))
            return frames

    (t1, first), (t2, _) = asyncio.run(run())
    assert t2 - t1 >= 0.5  # one frame per period, not a flood
    assert first["stream"] == "!markPrice@arr@1s" and isinstance(first["data"], list)
    rows = first["data"]
    for row in rows:
        assert {"e", "E", "s", "p", "ap", "i", "P", "r", "T", "st"} <= set(row) and row[
            "e"
        ] == "markPriceUpdate"
    usd_m = {row["s"] for row in rows if row["st"] == 1}
    assert {"BTCUSDT", "ETHUSDT", "SOLUSDT", "SUSHIUSDT", "AKROUSDT", "KEEPUSDT", "CTKUSDT"} <= usd_m
    coin_m = [row["s"] for row in rows if row["st"] == 2]
    assert len(coin_m) == 2 and all(s.endswith("_PERP") for s in coin_m)
    assert any(row["T"] == 0 and row["r"] == "0.00000000" for row in rows)


def test_generated_liquidations_are_single_objects_at_most_one_per_symbol_per_second(
    make_fake: FakeFactory,
) -> None:
    """!forceOrder@arr sends one object per frame, at most one per symbol per second when paced."""
    fake = make_fake(rate=100, futures_symbols=[f"S{i}USDT" for i in range(20)])

    async def run() -> list[dict[str, Any]]:
        async with websockets.connect(f"{fake.futures_ws_url}/market/stream?streams=!forceOrder@arr") as ws:
            return [(await recv_json(ws))["data"] for _ in range(8)]

    orders = asyncio.run(run())
    last_seen: dict[str, int] = {}
    for order in orders:
        assert order["e"] == "forceOrder" and order["st"] in (1, 2) and "ps" in order
        o = order["o"]
        assert {"s", "S", "o", "f", "q", "p", "ap", "X", "l", "z", "T"} <= set(o) and o["X"] == "FILLED"
        assert o["T"] - last_seen.get(o["s"], -(10**9)) >= 1000
        last_seen[o["s"]] = o["T"]


def test_about_one_liquidation_in_ten_is_coin_m() -> None:
    """The liquidation generator mixes in COIN-M objects (st:2, ps without _PERP) about 1 in 10."""
    marks = MarkPrices(["BTCUSDT", "ETHUSDT"], seed=3)
    orders = ForceOrders(["BTCUSDT", "ETHUSDT"], marks, seed=3)
    events = [orders.next_any(1_000_000 + i, paced=False) for i in range(2000)]
    coin_m = [json.loads(e.data) for e in events if e is not None and e.key is None]
    assert 100 <= len(coin_m) <= 300
    assert all(
        o["st"] == 2 and o["o"]["s"].endswith("_PERP") and o["ps"] + "_PERP" == o["o"]["s"] for o in coin_m
    )


@pytest.mark.parametrize(
    ("family", "name", "served"),
    [
        ("spot", "btcusdt@aggTrade", True),
        ("spot", "btcusdt@depth", True),
        ("spot", "btcusdt@depth@100ms", True),
        ("spot", "btcusdt@depth@500ms", False),  # spot has only 1000 ms and 100 ms
        ("spot", "BTCUSDT@aggTrade", False),  # symbols are lower case on the wire
        ("spot", "dogeusdt@aggTrade", False),  # not listed
        ("public", "btcusdt@depth@500ms", True),
        ("public", "btcusdt@depth@250ms", False),
        ("public", "btcusdt@aggTrade", False),  # /market stream on /public
        ("market", "btcusdt@depth", False),  # /public stream on /market
        ("market", "btcusdt@markPrice@1s", True),
        ("market", "btcusdt@forceOrder", True),
        ("market", "!markPrice@arr", True),
        ("market", "markPrice@arr@1s", False),  # missing "!"
        ("market", "!forceOrder@arr", True),
        ("legacy", "btcusdt@depth", False),  # retired 2026-04-23
    ],
)
def test_stream_names_are_judged_like_binance(family: PathFamily, name: str, served: bool) -> None:
    """Only exact, lower-case names on the right path are served; the rest are silent."""
    assert (parse_stream(family, name, {"BTCUSDT"}, {"BTCUSDT"}) is not None) == served


def test_liquidation_injection_reaches_matching_subscribers(make_fake: FakeFactory) -> None:
    """An injected liquidation goes at once to !forceOrder@arr and <s>@forceOrder, even when paused."""
    fake = make_fake(rate=100)
    fake.pause()

    async def run() -> tuple[list[str], list[str]]:
        url = f"{fake.futures_ws_url}/market/stream?streams=!forceOrder@arr/btcusdt@forceOrder"
        other = f"{fake.futures_ws_url}/market/stream?streams=ethusdt@forceOrder"
        async with websockets.connect(url) as ws, websockets.connect(other) as ws_other:
            await request_reply(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 1})
            await request_reply(ws_other, {"method": "LIST_SUBSCRIPTIONS", "id": 1})
            await asyncio.to_thread(fake.liquidation, "BTCUSDT", "SELL", "65000.5", "0.25")
            body = {"symbol": "BTCUSDT", "side": "BUY", "price": "64000", "quantity": "1.5"}
            status, _, answer = await asyncio.to_thread(http, "POST", f"{fake.control_url}/liquidation", body)
            assert status == 200 and answer["event"]["o"]["S"] == "BUY"
            await written(fake, 4)  # two liquidations, each on two streams
            return await recv_written(ws), await recv_written(ws_other)

    frames, other_frames = asyncio.run(run())
    assert other_frames == []
    streams = sorted(json.loads(f)["stream"] for f in frames)
    assert streams == ["!forceOrder@arr", "!forceOrder@arr", "btcusdt@forceOrder", "btcusdt@forceOrder"]
    first = json.loads(frames[0])["data"]
    assert first["st"] == 1 and first["o"]["s"] == "BTCUSDT" and first["o"]["p"] == "65000.5"
    keys = [k[:2] + k[3:] for k in fake.ledger()["force_orders"]]
    assert keys == [["BTCUSDT", "SELL", "65000.5", "0.25"], ["BTCUSDT", "BUY", "64000", "1.5"]]


def test_drop_aborts_every_connection_without_close_frame(make_fake: FakeFactory) -> None:
    """POST /_fake/drop cuts every socket like a network failure; reconnecting works."""
    fake = make_fake(rate=100)
    url = f"{fake.spot_ws_url}/stream?streams=btcusdt@aggTrade"

    async def run() -> list[websockets.ConnectionClosedError]:
        async with websockets.connect(url) as first, websockets.connect(url) as second:
            await recv_json(first)
            await recv_json(second)
            status, _, body = await asyncio.to_thread(http, "POST", f"{fake.control_url}/drop")
            assert status == 200 and body == {"dropped": 2}
            errors = []
            for ws in (first, second):
                with pytest.raises(websockets.ConnectionClosedError) as caught:
                    while True:
                        await asyncio.wait_for(ws.recv(), deadline(10))
                errors.append(caught.value)
        async with websockets.connect(url) as again:
            assert (await recv_json(again))["stream"] == "btcusdt@aggTrade"
        return errors

    for error in asyncio.run(run()):
        assert isinstance(error, websockets.ConnectionClosedError) and error.rcvd is None  # no close frame


def test_malformed_frames_are_sent_and_counted(make_fake: FakeFactory) -> None:
    """send_malformed(n) makes the next n frames invalid JSON; data frames still all arrive."""
    fake = make_fake(rate=0, max_events=20)
    fake.send_malformed(3)

    async def run() -> list[str]:
        async with websockets.connect(f"{fake.spot_ws_url}/stream?streams=btcusdt@aggTrade") as ws:
            await written(fake, 20)
            return await recv_written(ws)

    frames = asyncio.run(run())
    valid, broken = [], 0
    for frame in frames:
        try:
            valid.append(json.loads(frame))
        except ValueError:
            broken += 1
    assert broken == 3 and len(valid) == 20
    ledger = fake.ledger()
    assert ledger["malformed_sent"] == 3 and len(ledger["agg_trades"]) == 20


def test_rest_depth_open_interest_and_exchange_info(make_fake: FakeFactory) -> None:
    """REST answers Binance's bodies, errors and X-MBX-USED-WEIGHT-1M weights."""
    fake = make_fake(rate=10)
    spot, futures = fake.spot_rest_url, fake.futures_rest_url
    status, headers, body = http("GET", f"{spot}/api/v3/depth?symbol=BTCUSDT&limit=1000")
    assert status == 200 and set(body) == {"lastUpdateId", "bids", "asks"} and len(body["bids"]) > 10
    assert int(headers["X-MBX-USED-WEIGHT-1M"]) >= 50
    status, headers, body = http("GET", f"{futures}/fapi/v1/depth?symbol=SUSHIUSDT&limit=100")
    assert (
        status == 200 and set(body) == {"lastUpdateId", "E", "T", "bids", "asks"} and len(body["bids"]) == 100
    )
    assert "X-MBX-USED-WEIGHT-1M" in headers
    status, _, body = http("GET", f"{futures}/fapi/v1/depth?symbol=BTCUSDT&limit=7")
    assert (status, body) == (400, {"code": -4021, "msg": "7 is not valid depth limit"})
    for url in (f"{spot}/api/v3/depth?symbol=NOPEUSDT", f"{futures}/fapi/v1/openInterest?symbol=NOPEUSDT"):
        status, headers, body = http("GET", url)
        assert (status, body) == (400, {"code": -1121, "msg": "Invalid symbol."})
        assert "X-MBX-USED-WEIGHT-1M" in headers
    status, _, body = http("GET", f"{futures}/fapi/v1/openInterest?symbol=BTCUSDT")
    assert status == 200 and set(body) == {"openInterest", "symbol", "time"} and body["symbol"] == "BTCUSDT"
    assert float(body["openInterest"]) > 0 and isinstance(body["openInterest"], str)
    _, _, info = http("GET", f"{spot}/api/v3/exchangeInfo")
    assert {"BTCUSDT", "ETHUSDT", "NKNUSDT", "BLZETH", "LRCBTC", "RUNEEUR"} <= {
        s["symbol"] for s in info["symbols"]
    }
    _, _, info = http("GET", f"{futures}/fapi/v1/exchangeInfo")
    trading = {s["symbol"] for s in info["symbols"] if s["status"] == "TRADING"}
    assert trading == {"BTCUSDT", "ETHUSDT", "SUSHIUSDT", "AKROUSDT", "KEEPUSDT", "CTKUSDT"}


def test_rest_fault_injection_429_418_500(make_fake: FakeFactory) -> None:
    """fail_rest makes the next N requests answer 429/418 (with Retry-After) or 500, then recovers."""
    fake = make_fake(rate=10)
    url = f"{fake.futures_rest_url}/fapi/v1/openInterest?symbol=BTCUSDT"
    fake.fail_rest(429, 2, 3)
    for _ in range(2):
        status, headers, body = http("GET", url)
        assert (status, body) == (429, {"code": -1003, "msg": "Too many requests"})
        assert headers["Retry-After"] == "3" and "X-MBX-USED-WEIGHT-1M" in headers
    assert http("GET", url)[0] == 200
    status, _, _ = http("POST", f"{fake.control_url}/rest_fail?status=418&count=1&retry_after=120")
    assert status == 200
    status, headers, body = http("GET", url)
    assert status == 418 and headers["Retry-After"] == "120" and body["code"] == -1003
    fake.fail_rest(500, 1, 0)
    status, headers, _ = http("GET", f"{fake.spot_rest_url}/api/v3/depth?symbol=BTCUSDT")
    assert status == 500 and "Retry-After" not in headers
    assert http("GET", url)[0] == 200


def test_pause_resume_rate_and_connections_over_http(make_fake: FakeFactory) -> None:
    """The /_fake endpoints pause and resume data, change the rate and list connections."""
    fake = make_fake(rate=50)
    control = fake.control_url

    async def run() -> None:
        async with websockets.connect(
            f"{fake.spot_ws_url}/stream?streams=ethusdt@aggTrade/BAD@aggTrade"
        ) as ws:
            await recv_json(ws)
            _, _, listing = await asyncio.to_thread(http, "GET", f"{control}/connections")
            assert listing["connections"][0]["path"] == "/spot/stream"
            assert listing["connections"][0]["silent"] == ["BAD@aggTrade"]
            assert (await asyncio.to_thread(http, "POST", f"{control}/pause"))[0] == 200
            await recv_written(ws)
            # Nothing over a period, while paused: no connection gets data that could mark it.
            assert await recv_until_quiet(ws, 0.5) == []
            assert (await asyncio.to_thread(http, "POST", f"{control}/rate?value=0"))[0] == 200
            assert (await asyncio.to_thread(http, "POST", f"{control}/resume"))[0] == 200
            frames = [await recv_json(ws) for _ in range(2000)]  # full speed now
            assert all(f["stream"] == "ethusdt@aggTrade" for f in frames)
            await asyncio.to_thread(fake.pause)
            await recv_written(ws)
        assert (await asyncio.to_thread(http, "POST", f"{control}/rate?value=-1"))[0] == 400
        assert (await asyncio.to_thread(http, "POST", f"{control}/malformed?count=x"))[0] == 400

    asyncio.run(run())


def test_server_pings_and_closes_when_pongs_stop(make_fake: FakeFactory) -> None:
    """The server pings on its interval; a client that never answers is closed, one that does stays."""
    fake = make_fake(rate=10, ping_interval_s=0.3)

    async def silent_client(answering_open: asyncio.Event, closed: asyncio.Event) -> tuple[int, int | None]:
        # Opened after the answering client: its pong deadline falls after that one's.
        await answering_open.wait()
        pings = 0
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{fake.spot_ws_url}/stream", autoping=False) as ws:
                while True:
                    message = await ws.receive(timeout=deadline(10))
                    if message.type == aiohttp.WSMsgType.PING:
                        pings += 1
                    elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                        closed.set()
                        return (
                            pings,
                            ws.close_code if message.type is aiohttp.WSMsgType.CLOSED else message.data,
                        )

    async def answering_client(answering_open: asyncio.Event, silent_closed: asyncio.Event) -> Any:
        async with websockets.connect(f"{fake.spot_ws_url}/stream") as ws:
            answering_open.set()
            # The silent client, opened later, was closed for its missing pongs: this one has been
            # through its own pong deadline by then, answering.
            async with asyncio.timeout(deadline(10)):
                await silent_closed.wait()
            reply, _ = await request_reply(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 5})
            return reply

    async def run() -> tuple[tuple[int, int | None], Any]:
        answering_open, silent_closed = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(
            silent_client(answering_open, silent_closed), answering_client(answering_open, silent_closed)
        )

    (pings, close_code), reply = asyncio.run(run())
    assert pings >= 2 and close_code == 1008
    assert reply == {"result": [], "id": 5}


def test_cli_runs_in_foreground_until_sigterm() -> None:
    """`python -m collector.fake` prints its base URLs, serves, and exits 0 on SIGTERM."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "collector.fake",
            "--port",
            "0",
            "--rate",
            "5",
            "--spot-symbols",
            "BTCUSDT,SOLUSDT",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        fields = dict(part.split("=", 1) for part in line.split()[2:])
        assert fields["spot_ws"].startswith("ws://127.0.0.1:") and fields["spot_ws"].endswith("/spot")
        status, _, body = http("GET", f"{fields['spot_rest']}/api/v3/depth?symbol=SOLUSDT&limit=5")
        assert status == 200 and len(body["bids"]) == 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=deadline(20)) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_total_rate_is_shared_by_the_connections_sending_data(make_fake: FakeFactory) -> None:
    """With a total rate each data connection gets an even share; /_fake/counts counts what was sent."""
    fake = make_fake(rate=10)
    status, _, _ = http("POST", f"{fake.control_url}/rate?value=400&total=1")
    assert status == 200
    url = f"{fake.spot_ws_url}/stream?streams=btcusdt@aggTrade"

    def shares() -> list[float]:
        return fake._call(lambda c: [c.hub.connection_rate()])

    async def run() -> tuple[float, float]:
        async with websockets.connect(url) as first:
            await recv_json(first)
            alone = shares()[0]
            async with websockets.connect(url) as second:
                await recv_json(second)
                together = shares()[0]
                await recv_written(first)
                await recv_written(second)
        return alone, together

    alone, together = asyncio.run(run())
    assert (alone, together) == (400.0, 200.0)
    _, _, counts = http("GET", f"{fake.control_url}/counts")
    assert counts["rate_is_total"] is True and counts["rate"] == 400.0
    assert counts["data_frames_sent"] == fake.ledger()["data_frames_sent"] > 0
    fake.set_rate(10, total=False)
    assert shares() == [10.0]
