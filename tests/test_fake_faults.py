"""The fake exchange's connection faults, seen by real clients (websockets, aiohttp) on localhost."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from typing import Any

import aiohttp
import websockets

from collector.fake.server import FakeExchange
from tests.conftest import FakeFactory
from tests.processes import until
from tests.test_fake_exchange import (
    TIMEOUT_FACTOR,
    check_chain,
    deadline,
    http,
    recv_json,
    recv_written,
)

Frames = list[dict[str, Any]]


def connection_ids(fake: FakeExchange) -> dict[str, int]:
    """Open connections by their first stream name (each test gives every connection a distinct one)."""
    return {c["streams"][0]: c["id"] for c in fake.connections()}


def ledger_connection(ledger: dict[str, Any], connection_id: int) -> dict[str, Any]:
    return next(c for c in ledger["connections"] if c["id"] == connection_id)


async def recv_until_closed(ws: websockets.ClientConnection, timeout: float = 10.0) -> tuple[Frames, float]:
    """Every frame until the server closes the connection, and the monotonic time of the close."""
    frames: Frames = []
    try:
        async with asyncio.timeout(deadline(timeout)):
            while True:
                frames.append(json.loads(await ws.recv()))
    except websockets.ConnectionClosed:
        return frames, time.monotonic()


def data_count(log: list[tuple[float, str, Any]]) -> int:
    return sum(1 for _, kind, _ in log if kind == "data")


def resumed(log: list[tuple[float, str, Any]], since: float) -> set[str]:
    """The streams with a data frame received after `since`."""
    return {frame["stream"] for t, kind, frame in log if kind == "data" and t > since}


def data_of(frames: list[str] | Frames, stream: str) -> list[Any]:
    """The payloads of one stream's frames, in order (a dict per event, a list for `!markPrice@arr`)."""
    parsed = [json.loads(f) if isinstance(f, str) else f for f in frames]
    return [f["data"] for f in parsed if f.get("stream") == stream]


def test_withheld_depth_events_are_missing_exactly_as_the_ledger_lists_them(make_fake: FakeFactory) -> None:
    """withhold_depth skips the next N diffs of a symbol on every connection; the ledger lists just those."""
    fake = make_fake(rate=300)
    spot_url = f"{fake.spot_ws_url}/stream?streams=btcusdt@depth@100ms/ethusdt@depth"
    second_url = f"{fake.spot_ws_url}/stream?streams=btcusdt@depth"
    futures_url = f"{fake.futures_ws_url}/public/stream?streams=btcusdt@depth@500ms"

    async def run() -> tuple[list[str], list[str], list[str]]:
        async with (
            websockets.connect(spot_url) as spot,
            websockets.connect(second_url) as second,
            websockets.connect(futures_url) as futures,
        ):
            early = [[json.dumps(await recv_json(ws)) for _ in range(10)] for ws in (spot, second, futures)]
            await asyncio.to_thread(fake.withhold_depth, "spot", "BTCUSDT", 5)
            query = "market=futures&symbol=btcusdt&count=3"
            status, _, body = await asyncio.to_thread(
                http, "POST", f"{fake.control_url}/withhold_depth?{query}"
            )
            assert (status, body) == (200, {"ok": True})
            later = [[json.dumps(await recv_json(ws)) for _ in range(40)] for ws in (spot, second, futures)]
            await asyncio.to_thread(fake.pause)
            rest = await asyncio.gather(*(recv_written(ws) for ws in (spot, second, futures)))
        spot_frames, second_frames, futures_frames = (
            a + b + c for a, b, c in zip(early, later, rest, strict=True)
        )
        return spot_frames, second_frames, futures_frames

    spot_frames, second_frames, futures_frames = asyncio.run(run())
    ledger = fake.ledger()
    withheld_spot = [w for w in ledger["withheld"] if w["market"] == "spot"]
    withheld_futures = [w for w in ledger["withheld"] if w["market"] == "futures"]
    assert len(withheld_spot) == 5 and len(withheld_futures) == 3
    assert all(w["symbol"] == "BTCUSDT" and "pu" not in w for w in withheld_spot)
    assert all(w["symbol"] == "BTCUSDT" and "pu" in w for w in withheld_futures)

    for frames, stream in ((spot_frames, "btcusdt@depth@100ms"), (second_frames, "btcusdt@depth")):
        events = data_of(frames, stream)
        breaks = [(a, b) for a, b in itertools.pairwise(events) if b["U"] != a["u"] + 1]
        assert len(breaks) == 1  # one gap, the same on both connections
        before, after = breaks[0]
        check_chain("spot", [before, *withheld_spot, after])  # the withheld events fill it exactly
        assert {w["u"] for w in withheld_spot}.isdisjoint(e["u"] for e in events)
    check_chain("spot", data_of(spot_frames, "ethusdt@depth"))  # other symbols untouched

    events = data_of(futures_frames, "btcusdt@depth@500ms")
    breaks = [(a, b) for a, b in itertools.pairwise(events) if b["pu"] != a["u"]]
    assert len(breaks) == 1
    check_chain("futures", [breaks[0][0], *withheld_futures, breaks[0][1]])

    sent = {(m, s, u) for m, s, u, _ in ledger["depth_updates"]}
    assert not sent & {(w["market"], w["symbol"], w["u"]) for w in ledger["withheld"]}
    received = {
        (market, e["s"], e["u"])
        for market, frames in (("spot", spot_frames), ("spot", second_frames), ("futures", futures_frames))
        for e in (json.loads(f)["data"] for f in frames)
    }
    assert sent == received
    # The book advanced through the withheld diffs: the snapshot sits at the last u sent.
    snapshot = http("GET", f"{fake.spot_rest_url}/api/v3/depth?symbol=BTCUSDT&limit=5")[2]
    last_sent = max(u for m, s, u in sent if (m, s) == ("spot", "BTCUSDT"))
    assert snapshot["lastUpdateId"] == last_sent
    assert http("POST", f"{fake.control_url}/withhold_depth?market=spot&symbol=NOPEUSDT")[0] == 400


async def read_answering_pings(
    ws: aiohttp.ClientWebSocketResponse, log: list[tuple[float, str, Any]]
) -> None:
    """Log each ping and data frame with its arrival time, answering pings by hand (autoping off)."""
    while True:
        message = await ws.receive()
        if message.type == aiohttp.WSMsgType.PING:
            log.append((time.monotonic(), "ping", None))
            await ws.pong(message.data)
        elif message.type == aiohttp.WSMsgType.TEXT:
            log.append((time.monotonic(), "data", json.loads(message.data)))
        else:
            return


async def arrival_times(ws: websockets.ClientConnection, times: list[float]) -> None:
    """Read every frame, noting when each arrived, until the connection closes."""
    try:
        async for _ in ws:
            times.append(time.monotonic())
    except websockets.ConnectionClosed:
        return


def test_silence_keeps_pings_and_loses_exactly_the_ledgered_events(make_fake: FakeFactory) -> None:
    """A silenced spot connection gets pings but no data; its losses are ledgered; other connections flow."""
    silence_s = 1.2 * TIMEOUT_FACTOR
    fake = make_fake(rate=200, ping_interval_s=0.2)
    streams = ["ethusdt@aggTrade", "btcusdt@aggTrade", "btcusdt@depth@100ms"]
    url = f"{fake.spot_ws_url}/stream?streams={'/'.join(streams)}"
    futures_url = f"{fake.futures_ws_url}/market/stream?streams=btcusdt@aggTrade"
    late_url = f"{fake.spot_ws_url}/stream?streams=btcusdt@depth"

    async def run() -> tuple[list[tuple[float, str, Any]], float, float, list[int], list[float], list[float]]:
        log: list[tuple[float, str, Any]] = []
        futures_times: list[float] = []
        late_times: list[float] = []
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, autoping=False) as silent,
            websockets.connect(futures_url) as futures,
        ):
            # Every client reads all the time: a websockets client that stops reading stops answering
            # pings, and the 0.2 s pings would close it for a missing pong.
            readers = [
                asyncio.create_task(read_answering_pings(silent, log)),
                asyncio.create_task(arrival_times(futures, futures_times)),
            ]
            await until(lambda: data_count(log) >= 10, 10, "10 data frames on the connection to silence")
            asked = time.monotonic()
            silenced = await asyncio.to_thread(fake.silence, silence_s, "spot")
            started = time.monotonic()
            async with websockets.connect(late_url) as late:  # opened after the silence began
                readers.append(asyncio.create_task(arrival_times(late, late_times)))
                await until(
                    lambda: resumed(log, asked + silence_s) == set(streams),
                    silence_s + 10,
                    "data again on every stream of the silenced connection",
                )
                await asyncio.to_thread(fake.pause)
                # Paused, the silenced connection gets nothing more than what is already written.
                await until(
                    lambda: data_count(log) == ledger_connection(fake.ledger(), silenced[0])["data_frames"],
                    10,
                    "every frame written to the silenced connection received",
                )
                for reader in readers:
                    reader.cancel()
        return log, asked, started, silenced, futures_times, late_times

    log, asked, started, silenced, futures_times, late_times = asyncio.run(run())
    ledger = fake.ledger()
    [silent_id] = silenced  # market="spot": the futures connection is untouched
    paths = {c["id"]: c["path"] for c in ledger["connections"]}
    assert paths[silent_id] == "/spot/stream" and "/futures/market/stream" in paths.values()
    silent_until = asked + silence_s
    for times in (futures_times, late_times):  # both got data while the first one was silent
        assert sum(1 for t in times if started < t < silent_until) >= 5
    window = [(t, kind) for t, kind, _ in log if started + 0.15 < t < silent_until]
    assert [kind for _, kind in window if kind == "data"] == []
    assert sum(1 for _, kind in window if kind == "ping") >= 3  # pings are not data
    assert any(kind == "data" and t > silent_until for t, kind, _ in log)  # data resumed

    [silence] = ledger["silences"]
    assert silence["connection"] == silent_id and silence["path"] == "/spot/stream"
    assert silence_s * 1000 - 20 <= silence["end_ms"] - silence["start_ms"] <= silence_s * 1000 + 300
    received = [frame for _, kind, frame in log if kind == "data"]
    lost_total = 0
    for stream in ("ethusdt@aggTrade", "btcusdt@aggTrade"):
        got = [e["a"] for e in data_of(received, stream)]
        lost = silence["streams"][stream]["a"]
        assert lost and not set(lost) & set(got)
        assert sorted(got + lost) == list(range(got[0], got[-1] + 1))  # together: every id, once
        lost_total += len(lost)
    # Only this connection carried ETHUSDT spot trades: what it lost was sent nowhere.
    sent_eth = {a for m, s, a, _ in ledger["agg_trades"] if (m, s) == ("spot", "ETHUSDT")}
    assert not sent_eth & set(silence["streams"]["ethusdt@aggTrade"]["a"])
    depth = data_of(received, "btcusdt@depth@100ms")
    lost_depth = silence["streams"]["btcusdt@depth@100ms"]["updates"]
    assert lost_depth and not {u["u"] for u in lost_depth} & {e["u"] for e in depth}
    check_chain("spot", sorted(depth + lost_depth, key=lambda e: e["u"]))
    lost_total += len(lost_depth)
    assert silence["count"] == lost_total == ledger_connection(ledger, silent_id)["not_delivered"]


def test_silence_counts_lost_mark_prices_and_liquidations(make_fake: FakeFactory) -> None:
    """Silencing USD-M connections counts the markPrice and forceOrder frames they did not get."""
    fake = make_fake(rate=50)
    url = f"{fake.futures_ws_url}/market/stream?streams=!markPrice@arr@1s/!forceOrder@arr/btcusdt@forceOrder"

    async def run() -> tuple[Frames, Frames, dict[str, Any]]:
        async with websockets.connect(url) as ws:
            frames: Frames = []
            while len(data_of(frames, "!markPrice@arr@1s")) < 1:
                frames.append(await recv_json(ws))
            status, _, body = await asyncio.to_thread(
                http, "POST", f"{fake.control_url}/silence?seconds={1.2 * TIMEOUT_FACTOR}&market=futures"
            )
            assert status == 200
            while len(data_of(frames, "!markPrice@arr@1s")) < 2:
                frames.append(await recv_json(ws))
            # Paused, only injected liquidations flow: three during a second silence, one after it.
            await asyncio.to_thread(fake.pause)
            frames += [json.loads(f) for f in await recv_written(ws)]
            await asyncio.to_thread(fake.silence, 0.5 * TIMEOUT_FACTOR)
            for price in ("100", "101", "102"):
                await asyncio.to_thread(fake.liquidation, "BTCUSDT", "SELL", price, "1")
            await until(lambda: not any(c["silenced"] for c in fake.connections()), 10, "the silence over")
            await asyncio.to_thread(fake.liquidation, "BTCUSDT", "BUY", "103", "2")
            await until(
                lambda: any(order[3] == "103" for order in fake.ledger()["force_orders"]), 10, "103 written"
            )
            after = [json.loads(f) for f in await recv_written(ws)]
        return frames, after, body

    frames, after, body = asyncio.run(run())
    ledger = fake.ledger()
    first, second = ledger["silences"]
    assert body["connections"] == [first["connection"]] == [second["connection"]]
    marks = first["streams"]["!markPrice@arr@1s"]
    assert marks["kind"] == "markPriceAll" and marks["symbol"] is None and "a" not in marks
    times = [rows[0]["E"] for rows in data_of(frames, "!markPrice@arr@1s")]
    longest = max(b - a for a, b in itertools.pairwise(times))
    assert marks["count"] >= 1 and round(longest / 1000) - 1 == marks["count"]  # one per missing second
    lost_liquidations = second["streams"]["btcusdt@forceOrder"]
    assert lost_liquidations["count"] == second["streams"]["!forceOrder@arr"]["count"] == 3
    assert second["count"] == 6
    assert [(f["stream"], f["data"]["o"]["p"]) for f in after] == [
        ("!forceOrder@arr", "103"),
        ("btcusdt@forceOrder", "103"),
    ]
    sent_prices = {p for _, _, _, p, _ in ledger["force_orders"]}
    assert "103" in sent_prices and not sent_prices & {"100", "101", "102"}


def test_server_shutdown_notice_then_close_lets_a_replacement_lose_nothing(make_fake: FakeFactory) -> None:
    """Spot gets the serverShutdown notice, data for notice_s, then 1001; a replacement loses nothing."""
    notice_s = 1.0 * TIMEOUT_FACTOR
    fake = make_fake(rate=200)
    old_url = f"{fake.spot_ws_url}/stream?streams=btcusdt@aggTrade/btcusdt@depth@100ms"
    new_url = f"{fake.spot_ws_url}/stream?streams=btcusdt@depth@100ms/btcusdt@aggTrade"
    futures_url = f"{fake.futures_ws_url}/public/stream?streams=btcusdt@depth"

    async def run() -> dict[str, Any]:
        async with websockets.connect(old_url) as old, websockets.connect(futures_url) as futures:
            early = [await recv_json(old) for _ in range(5)]
            await recv_json(futures)
            ids = await asyncio.to_thread(connection_ids, fake)
            asked = time.monotonic()
            status, _, body = await asyncio.to_thread(
                http, "POST", f"{fake.control_url}/server_shutdown?notice_s={notice_s}"
            )
            assert status == 200
            before_notice = []
            while (frame := await recv_json(old))["stream"] != "!serverShutdown":
                before_notice.append(frame)
            async with websockets.connect(new_url) as new:  # make before break
                during, closed_at = await recv_until_closed(old)
                futures_frames, futures_closed_at = await recv_until_closed(futures)
                more = [await recv_json(new) for _ in range(20)]
                await asyncio.to_thread(fake.pause)
                more += [json.loads(f) for f in await recv_written(new)]
        return {
            "ids": ids,
            "body": body,
            "notice": frame,
            "old": early + before_notice + during,
            "during": during,
            "new": more,
            "old_close": (old.close_code, old.close_reason, closed_at - asked),
            "futures_close": (futures.close_code, futures_closed_at - asked),
            "futures_frames": futures_frames,
        }

    seen = asyncio.run(run())
    old_id, futures_id = seen["ids"]["btcusdt@aggTrade"], seen["ids"]["btcusdt@depth"]
    assert seen["body"] == {"ok": True, "connections": [old_id, futures_id], "notified": [old_id]}
    notice = seen["notice"]
    assert set(notice) == {"stream", "data"} and set(notice["data"]) == {"e", "E"}
    assert notice["data"]["e"] == "serverShutdown"
    assert len(seen["during"]) > 20  # data kept flowing during the notice
    code, reason, after_s = seen["old_close"]
    assert (code, reason) == (1001, "") and notice_s - 0.05 <= after_s <= notice_s + 0.5 * TIMEOUT_FACTOR
    futures_code, futures_after_s = seen["futures_close"]
    assert futures_code == 1001 and notice_s - 0.05 <= futures_after_s <= notice_s + 0.5 * TIMEOUT_FACTOR
    assert all(f["stream"] == "btcusdt@depth" for f in seen["futures_frames"])  # no notice on USD-M

    # The old and the new connection together carry every trade id and an unbroken depth chain.
    old, new = seen["old"], seen["new"]
    trades = sorted({e["a"] for e in data_of(old, "btcusdt@aggTrade") + data_of(new, "btcusdt@aggTrade")})
    assert trades == list(range(trades[0], trades[-1] + 1))
    depth = {e["u"]: e for e in data_of(old, "btcusdt@depth@100ms") + data_of(new, "btcusdt@depth@100ms")}
    check_chain("spot", sorted(depth.values(), key=lambda e: e["u"]))

    ledger = fake.ledger()
    old_record, futures_record = ledger_connection(ledger, old_id), ledger_connection(ledger, futures_id)
    assert old_record["shutdown_notice_ms"] == notice["data"]["E"]
    assert futures_record["shutdown_notice_ms"] is None
    for record in (old_record, futures_record):
        close = record["server_close"]
        assert (close["code"], close["reason"], close["cause"]) == (1001, "", "shutdown")
        assert not record["open"]
    assert old_record["control_frames"] == 1 and ledger["silences"] == [] and ledger["withheld"] == []
    assert ledger["data_frames_sent"] == sum(c["data_frames"] for c in ledger["connections"])


def test_connections_are_cut_at_max_connection_age(make_fake: FakeFactory) -> None:
    """Each connection is closed with 1001 when it reaches max_connection_age_s, counted from its start."""
    age_s = 0.8 * TIMEOUT_FACTOR
    fake = make_fake(rate=50, max_connection_age_s=age_s)

    async def lifetime(stream: str, delay_s: float) -> tuple[int | None, float, int]:
        await asyncio.sleep(delay_s)  # staggered opening: each age is counted from its own start
        opened = time.monotonic()
        async with websockets.connect(f"{fake.spot_ws_url}/stream?streams={stream}") as ws:
            frames, closed_at = await recv_until_closed(ws)
        return ws.close_code, closed_at - opened, len(frames)

    async def run() -> list[tuple[int | None, float, int]]:
        return list(await asyncio.gather(lifetime("btcusdt@aggTrade", 0), lifetime("ethusdt@aggTrade", 0.4)))

    for code, lived_s, frames in asyncio.run(run()):
        assert code == 1001 and frames > 5
        assert age_s - 0.05 <= lived_s <= age_s + 0.4 * TIMEOUT_FACTOR
    closes = [c["server_close"] for c in fake.ledger()["connections"]]
    assert [(c["code"], c["cause"]) for c in closes] == [(1001, "max_age"), (1001, "max_age")]


def test_cli_max_connection_age_flag_cuts_connections() -> None:
    """`collector fake-exchange --max-connection-age-s` sets the lifetime cut of the CLI server."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "collector.fake",
            "--port",
            "0",
            "--rate",
            "20",
            "--max-connection-age-s",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        fields = dict(part.split("=", 1) for part in process.stdout.readline().split()[2:])

        async def run() -> tuple[int | None, float]:
            opened = time.monotonic()
            async with websockets.connect(f"{fields['spot_ws']}/stream?streams=btcusdt@aggTrade") as ws:
                _, closed_at = await recv_until_closed(ws)
            return ws.close_code, closed_at - opened

        code, lived_s = asyncio.run(run())
        assert code == 1001 and 0.45 <= lived_s <= 0.5 + 0.5 * TIMEOUT_FACTOR
    finally:
        process.terminate()
        process.wait(timeout=deadline(20))


async def burst(ws: websockets.ClientConnection, first_id: int, count: int) -> list[Any]:
    """Send `count` LIST_SUBSCRIPTIONS back to back; the replies (fewer if the server closes)."""
    for i in range(count):
        await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": first_id + i}))
    replies: list[Any] = []
    try:
        for _ in range(count):
            replies.append(await recv_json(ws))
    except websockets.ConnectionClosed:
        pass
    return replies


def test_incoming_message_limit_is_5_per_s_on_spot_and_10_on_futures(make_fake: FakeFactory) -> None:
    """More than 5 (spot) or 10 (USD-M) client messages within a second close the connection with 1008."""
    fake = make_fake(rate=10)

    async def run() -> None:
        async with websockets.connect(f"{fake.spot_ws_url}/stream") as spot:
            assert [r["id"] for r in await burst(spot, 1, 5)] == [1, 2, 3, 4, 5]
            await asyncio.sleep(1.05)  # the window slides: another 5 are fine
            assert [r["id"] for r in await burst(spot, 6, 5)] == [6, 7, 8, 9, 10]
            assert await burst(spot, 11, 1) == []  # the 6th within a second is not answered
            assert (spot.close_code, spot.close_reason) == (1008, "Too many requests")
        async with websockets.connect(f"{fake.spot_ws_url}/stream") as spot:
            for _ in range(3):
                await spot.ping()  # spot counts client pings too (binance.md §2)
            assert len(await burst(spot, 1, 3)) == 2 and spot.close_code == 1008
        async with websockets.connect(f"{fake.futures_ws_url}/market/stream") as futures:
            for _ in range(12):
                await futures.ping()  # not counted on USD-M
            assert len(await burst(futures, 1, 10)) == 10
            assert await burst(futures, 11, 1) == []
            assert (futures.close_code, futures.close_reason) == (1008, "Too many requests")

    asyncio.run(run())
    records = fake.ledger()["connections"]
    assert [r["server_close"]["cause"] for r in records] == ["rate_limit"] * 3
    assert [r["incoming_messages"] for r in records] == [11, 6, 11]
