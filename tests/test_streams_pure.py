"""Pure parts of the stream process: backoff delays, control messages, frame routing, the handler."""

from __future__ import annotations

import itertools
import random

import orjson
import pytest
import redis.asyncio

from collector.binance.streams import ConnectionPlan
from collector.queue.envelope import make_envelope, parse_envelope
from collector.streams.backoff import Reconnects, backoff_delays
from collector.streams.handler import FrameHandler
from collector.streams.routing import route
from collector.streams.sink import Sink, SinkOptions
from collector.streams.state import ConnectionState
from collector.streams.subscriptions import control_message, resubscribe_messages

AGG_TRADE = (
    b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1672515782136,"s":"BTCUSDT","a":12345,'
    b'"p":"0.001","q":"100","f":100,"l":105,"T":1672515782136,"m":true,"M":true}}'
)
FUTURES_DEPTH = (
    b'{"stream":"btcusdt@depth@500ms","data":{"e":"depthUpdate","E":123456789,"T":123456788,'
    b'"s":"BTCUSDT","U":157,"u":160,"pu":149,"b":[["0.0024","10"]],"a":[["0.0026","100"]]}}'
)
MARK_PRICES = (
    b'{"stream":"!markPrice@arr@1s","data":[{"e":"markPriceUpdate","E":1562305380000,"s":"BTCUSDT",'
    b'"p":"11794.15","i":"11784.62","P":"11784.25","r":"0.00038167","T":1562306400000,"st":1}]}'
)
FORCE_ORDER = (
    b'{"stream":"!forceOrder@arr","data":{"e":"forceOrder","E":1568014460893,"o":{"s":"BTCUSDT",'
    b'"S":"SELL","o":"LIMIT","f":"IOC","q":"0.014","p":"9910","ap":"9910","X":"FILLED","l":"0.014",'
    b'"z":"0.014","T":1568014460893}}}'
)


class _Top(random.Random):
    """An rng that always draws the top of the range, so each delay equals its ceiling."""

    def random(self) -> float:
        return 1.0


def test_backoff_ceilings_double_up_to_the_maximum() -> None:
    """Without jitter the delays are initial * 2**n, capped at the maximum and staying there."""
    delays = list(itertools.islice(backoff_delays(0.5, 10.0, rng=_Top()), 8))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_backoff_full_jitter_stays_within_bounds_and_grows() -> None:
    """Each delay is uniform in [0, ceiling]; later attempts reach far longer delays than the first."""
    rng = random.Random(7)
    samples = [list(itertools.islice(backoff_delays(1.0, 60.0, factor=2, rng=rng), 10)) for _ in range(300)]
    for attempt in range(10):
        ceiling = min(60.0, 2.0**attempt)
        column = [run[attempt] for run in samples]
        assert all(0 <= delay <= ceiling for delay in column)
        assert max(column) > 0.8 * ceiling  # the whole range is used, not just its bottom
    first_mean = sum(run[0] for run in samples) / len(samples)
    last_mean = sum(run[9] for run in samples) / len(samples)
    assert last_mean > 10 * first_mean


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    """The generator is pure: the same seed gives the same delays."""
    first = list(itertools.islice(backoff_delays(1, 30, rng=random.Random(3)), 12))
    second = list(itertools.islice(backoff_delays(1, 30, rng=random.Random(3)), 12))
    assert first == second


def test_backoff_rejects_nonsense() -> None:
    """Non-positive delays or a shrinking factor are refused."""
    with pytest.raises(ValueError):
        next(backoff_delays(0, 10))
    with pytest.raises(ValueError):
        next(backoff_delays(1, 10, factor=0.5))


def test_reconnects_number_attempts_with_growing_delays_until_reset() -> None:
    """Attempt n waits the n-th backoff delay; a reset starts again from attempt 1 and the first delay;
    an immediate attempt (a shutdown notice) waits 0 s and leaves the delays where they were."""
    reconnects = Reconnects(0.5, 4.0, rng=_Top())
    assert [reconnects.next() for _ in range(5)] == [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0)]
    reconnects.reset()
    assert reconnects.next(immediate=True) == (1, 0.0)
    assert reconnects.next() == (2, 0.5)


def test_control_messages_are_binance_json() -> None:
    """SUBSCRIBE/UNSUBSCRIBE are `{"method", "params", "id"}` as binance.md §1.3 shows them."""
    text = control_message("SUBSCRIBE", ("btcusdt@aggTrade", "btcusdt@depth"), 1)
    assert text == '{"method":"SUBSCRIBE","params":["btcusdt@aggTrade","btcusdt@depth"],"id":1}'
    assert orjson.loads(control_message("UNSUBSCRIBE", ["btcusdt@depth"], 312)) == {
        "method": "UNSUBSCRIBE",
        "params": ["btcusdt@depth"],
        "id": 312,
    }


def test_resubscribe_is_unsubscribe_then_subscribe_of_one_stream() -> None:
    """A silent stream is restarted by two messages naming it alone, UNSUBSCRIBE first."""
    assert resubscribe_messages("btcusdt@depth@100ms") == [
        ("UNSUBSCRIBE", ("btcusdt@depth@100ms",)),
        ("SUBSCRIBE", ("btcusdt@depth@100ms",)),
    ]


@pytest.mark.parametrize(
    ("frame", "stream", "table"),
    [
        (AGG_TRADE, "btcusdt@aggTrade", "agg_trades"),
        (FUTURES_DEPTH, "btcusdt@depth@500ms", "depth_updates"),
        (MARK_PRICES, "!markPrice@arr@1s", "mark_prices"),
        (FORCE_ORDER, "!forceOrder@arr", "force_orders"),
        (b'{"stream":"ethusdt@depth@100ms","data":{}}', "ethusdt@depth@100ms", "depth_updates"),
    ],
)
def test_route_sends_events_to_their_table(frame: bytes, stream: str, table: str) -> None:
    """A combined-stream event is routed by its stream name to the table that name feeds."""
    decision = route(frame)
    assert (decision.kind, decision.stream, decision.table) == ("event", stream, table)


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (b'{"stream":"btcusdt@agg', "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"[1,2,3]", "not a JSON object"),
        (b'"just a string"', "not a JSON object"),
        (b'{"stream":"btcusdt@aggTrade"}', "combined-stream"),
        (b'{"stream":42,"data":{}}', "combined-stream"),
        (b'{"e":"aggTrade","s":"BTCUSDT"}', "combined-stream"),
        (b'{"stream":"btcusdt@bookTicker","data":{}}', "feeds no table"),
        (b'{"stream":"btcusdt@depth20","data":{}}', "feeds no table"),
        (b'{"error":{"code":2,"msg":"Invalid request"},"id":1}', "server error"),
    ],
)
def test_route_dead_letters_what_cannot_be_stored(frame: bytes, words: str) -> None:
    """Non-JSON, non-combined frames and streams that feed no table become dead letters with a reason."""
    decision = route(frame)
    assert decision.kind == "deadletter"
    assert words in decision.reason


def test_route_recognises_control_and_shutdown_messages() -> None:
    """SUBSCRIBE acks are control messages; a serverShutdown notice, combined or raw, asks to reconnect."""
    assert route(b'{"result":null,"id":1}').kind == "control"
    shutdown = b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1}}'
    assert route(shutdown).kind == "shutdown"
    assert route(b'{"e":"serverShutdown","E":1746000000000}').kind == "shutdown"


def _state(market: str = "futures") -> ConnectionState:
    plan = ConnectionPlan(
        "futures-market-0" if market == "futures" else "spot-0",
        "futures" if market == "futures" else "spot",
        "market" if market == "futures" else "spot",
        "ws://127.0.0.1:1/market/stream?streams=btcusdt@aggTrade",
        ("btcusdt@aggTrade",),
    )
    return ConnectionState.from_plan(plan)


def _sink() -> Sink:
    # The client is never used: these tests only buffer, they do not flush.
    return Sink(redis.asyncio.Redis(), SinkOptions(0.05, 10_000, 1_000_000))


def test_handler_wraps_frames_unmodified_and_counts_them() -> None:
    """Events land in their table's buffer as envelopes embedding the frame byte for byte, numbered
    per table within the run (collector.audit)."""
    state, sink = _state(), Sink(redis.asyncio.Redis(), SinkOptions(0.05, 10_000, 1_000_000), run="r1")
    handler = FrameHandler(state, sink)
    handler(AGG_TRADE, 1_700_000_000_000_001)
    handler(AGG_TRADE, 1_700_000_000_000_002)
    handler(FORCE_ORDER, 1_700_000_000_000_003)
    trades = sink.buffered_envelopes("agg_trades")
    assert trades == [
        make_envelope("futures", 1_700_000_000_000_001, AGG_TRADE, audit=b',"run":"r1","seq":1'),
        make_envelope("futures", 1_700_000_000_000_002, AGG_TRADE, audit=b',"run":"r1","seq":2'),
    ]
    assert sink.buffered_envelopes("force_orders")[0].startswith(
        b'{"market":"futures","received_at_us":1700000000000003,"run":"r1","seq":1,'
    )
    assert AGG_TRADE in trades[0]
    assert parse_envelope("force_orders", sink.buffered_envelopes("force_orders")[0]).rows
    assert sink.buffered == 3
    assert state.messages == 3 and state.last_message_us == 1_700_000_000_000_003
    assert state.stream_stats["btcusdt@aggTrade"].messages == 2
    assert state.stream_stats["!forceOrder@arr"].last_message_us == 1_700_000_000_000_003


def test_handler_dead_letters_and_signals_shutdown() -> None:
    """Garbage goes to the dead-letter buffer, acks are dropped, a shutdown notice calls back."""
    state, sink = _state("spot"), _sink()
    calls: list[str] = []
    handler = FrameHandler(state, sink, on_server_shutdown=lambda: calls.append("reconnect"))
    handler(b"not json at all", 5)
    handler(b'{"result":null,"id":7}', 6)
    handler(b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1}}', 7)
    assert calls == ["reconnect"]
    assert sink.buffered == 1 and state.messages == 0
    (letter,) = sink.buffered_deadletters()
    assert (letter.source, letter.connection, letter.market) == ("streams", "spot-0", "spot")
    assert letter.frame == b"not json at all" and letter.received_at_us == 5


def test_connection_state_json_names_every_field() -> None:
    """The JSON mirrored to Redis carries the connection's identity, phase and counters."""
    state = _state()
    state.state = "connected"
    state.reconnects = 2
    value = orjson.loads(state.to_json())
    assert value["id"] == "futures-market-0" and value["state"] == "connected"
    assert value["streams"] == ["btcusdt@aggTrade"] and value["reconnects"] == 2
    assert set(value) == {
        "id", "market", "family", "url", "streams", "state", "connected_since_us",
        "last_message_us", "messages", "reconnects", "last_error",
    }  # fmt: skip
