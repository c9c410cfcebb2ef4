"""One dead-letter format: every writer produces the same record, and the bytes come back exactly."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
import redis
import redis.asyncio
import requests

from collector.binance.streams import ConnectionPlan
from collector.db.connection import connect
from collector.db.init import init_db
from collector.drain import Drainer
from collector.queue import deadletter, keys
from collector.queue.deadletter import DeadLetter
from collector.queue.envelope import make_envelope, split_envelope
from collector.rest.poll import poll_open_interest
from collector.settings import Settings, get_settings
from collector.streams.handler import FrameHandler
from collector.streams.sink import Sink, SinkOptions
from collector.streams.state import ConnectionState

# Not UTF-8 (0xff never is), with a NUL and bytes that a lossy decode would replace.
BINARY = b"\xff\xfe\x00\x80{garbage\xc3("
# The keys of every record, in order; then exactly one of `frame` / `frame_b64`.
HEAD_KEYS = [
    "reason", "source", "market", "table", "symbol", "connection", "run", "seq",
    "received_at_us", "dead_at_us",
]  # fmt: skip


@pytest.mark.parametrize(
    "frame", [BINARY, b"", b'{"stream":"x@aggTrade"', "caf\u00e9 \U0001f600".encode(), bytes(range(256))]
)
def test_frame_round_trips_byte_exact(frame: bytes) -> None:
    """Any frame, UTF-8 or not, comes back from the stored JSON byte for byte."""
    letter = DeadLetter(
        "frame is not JSON", "streams", "spot", None, 1, frame, connection="spot-0", dead_at_us=2
    )
    assert DeadLetter.from_json(letter.to_json()) == letter


def test_non_utf8_frame_is_base64_and_text_stays_text() -> None:
    """Valid UTF-8 is stored readable under `frame`; anything else under `frame_b64`, never replaced."""
    binary = orjson.loads(DeadLetter("r", "rest", "futures", "open_interest", 1, BINARY).to_json())
    text = orjson.loads(DeadLetter("r", "rest", "futures", "open_interest", 1, b"<html>").to_json())
    assert list(binary) == [*HEAD_KEYS, "frame_b64"] and list(text) == [*HEAD_KEYS, "frame"]
    assert text["frame"] == "<html>"


def test_records_of_the_old_formats_are_still_read() -> None:
    """Entries written before the one format (drain `envelope`, streams without table) are readable."""
    old_drain = orjson.dumps({"reason": "x", "source": "drain", "table": "agg_trades", "envelope": "{no"})
    letter = DeadLetter.from_json(old_drain)
    assert (letter.frame, letter.table, letter.market, letter.received_at_us) == (
        b"{no",
        "agg_trades",
        None,
        None,
    )
    with pytest.raises(ValueError, match="source"):
        DeadLetter.from_json(b'{"reason":"x","frame":"y"}')


def test_split_envelope_inverts_make_envelope() -> None:
    """The drain recovers the frame and head of an envelope exactly, audit tag and symbol included."""
    tagged = make_envelope("spot", 17, BINARY, audit=b',"run":"r9-1","seq":42')
    rest = make_envelope("futures", 18, b'{"x":1}', symbol="BTCUSDT")
    assert split_envelope(tagged) == ("spot", 17, BINARY, None, "r9-1", 42)
    assert split_envelope(rest) == ("futures", 18, b'{"x":1}', "BTCUSDT", None, None)
    assert split_envelope(b"{not json") is None


def test_push_and_read_through_redis(redis_conn: redis.Redis) -> None:
    """`push` writes the letters and counts them per source in the caller's transaction; `read` gives
    them back exactly."""
    letters = [
        DeadLetter("a", "streams", "spot", None, 1, BINARY, connection="spot-0"),
        DeadLetter("b", "drain", "futures", "agg_trades", 2, b"{}", run="r1", seq=3),
        DeadLetter("c", "drain", None, "agg_trades", None, b"\xff"),
    ]
    pipe = redis_conn.pipeline(transaction=True)
    deadletter.push(pipe, letters)
    pipe.execute()
    assert deadletter.read(redis_conn) == letters
    assert redis_conn.hgetall(keys.metric("deadletters")) == {b"streams": b"1", b"drain": b"2"}


# --- every writer, through its real path -----------------------------------------------------------


def _from_streams(settings: Settings, redis_conn: redis.Redis) -> bytes:
    plan = ConnectionPlan("spot-0", "spot", "spot", "ws://127.0.0.1:1/stream", ("btcusdt@aggTrade",))

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        sink = Sink(client, SinkOptions(0.05, 10_000, 1_000_000), run="r1")
        FrameHandler(ConnectionState.from_plan(plan), sink)(BINARY, 1_700_000_000_000_001)
        await sink.flush()
        await client.aclose()

    asyncio.run(run())
    return redis_conn.lindex(keys.DEADLETTER, -1)  # type: ignore[return-value]


def _from_drain(settings: Settings, redis_conn: redis.Redis) -> bytes:
    envelope = make_envelope("futures", 1_700_000_000_000_002, BINARY, audit=b',"run":"r1","seq":7')
    redis_conn.rpush(keys.queue("agg_trades"), envelope)
    init_db(settings)
    result = Drainer(settings, redis_conn, lambda: connect(settings)).drain("agg_trades")
    assert result.dead_letters == 1
    return redis_conn.lindex(keys.DEADLETTER, -1)  # type: ignore[return-value]


def _from_rest(settings: Settings, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> bytes:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(BINARY)))
            self.end_headers()
            self.wfile.write(BINARY)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("BINANCE_FUTURES_REST_URL", f"http://127.0.0.1:{server.server_port}")
        get_settings.cache_clear()
        with requests.Session() as session:
            poll_open_interest(get_settings(), redis_conn, session, ["BTCUSDT"])
    finally:
        server.shutdown()
        server.server_close()
        get_settings.cache_clear()
    return redis_conn.lindex(keys.DEADLETTER, -1)  # type: ignore[return-value]


@pytest.mark.parametrize("writer", ["streams", "drain", "rest"])
def test_every_writer_produces_the_same_record(
    writer: str, settings: Settings, redis_conn: redis.Redis, db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream process, the drain and the REST pollers write the same keys in the same order, and
    a non-UTF-8 frame comes back byte for byte from each."""
    if writer == "streams":
        raw = _from_streams(settings, redis_conn)
    elif writer == "drain":
        raw = _from_drain(settings, redis_conn)
    else:
        raw = _from_rest(settings, redis_conn, monkeypatch)
    assert list(orjson.loads(raw)) == [*HEAD_KEYS, "frame_b64"]
    letter = DeadLetter.from_json(raw)
    assert letter.frame == BINARY and letter.source == writer and letter.reason
    assert letter.market == ("spot" if writer == "streams" else "futures")
    assert letter.received_at_us is not None and letter.dead_at_us > 0
    assert redis_conn.hgetall(keys.metric("deadletters")) == {writer.encode(): b"1"}
