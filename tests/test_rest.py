"""Binance REST: pure builders and verdicts, then the client and pollers against the fake exchange."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import orjson
import pytest
import redis
import requests

from collector.binance.rest import (
    DEFAULT_RETRY_AFTER_S,
    backoff_s,
    classify,
    depth_request,
    futures_depth_weight,
    open_interest_request,
    retry_after_s,
    spot_depth_weight,
    used_weight,
)
from collector.errors import RateLimited, RestError
from collector.fake.server import FakeExchange
from collector.queue import keys
from collector.queue.envelope import parse_envelope
from collector.rest.client import RestClient
from collector.rest.poll import body_problem, poll_depth_snapshots, poll_open_interest
from collector.retry import is_transient
from collector.settings import Settings, get_settings, load_settings
from tests.conftest import TIMEOUT_FACTOR

# --- pure ---------------------------------------------------------------------------------------


def test_request_builders() -> None:
    """URLs are the base plus Binance's path, with symbol and limit as parameters and the right weight."""
    spot = depth_request("spot", "https://api.binance.com/", "BTCUSDT", 1000)
    assert (spot.url, spot.params, spot.weight) == (
        "https://api.binance.com/api/v3/depth",
        {"symbol": "BTCUSDT", "limit": 1000},
        50,
    )
    futures = depth_request("futures", "http://127.0.0.1:9/futures", "ETHUSDT", 500)
    assert (futures.url, futures.params, futures.weight) == (
        "http://127.0.0.1:9/futures/fapi/v1/depth",
        {"symbol": "ETHUSDT", "limit": 500},
        10,
    )
    oi = open_interest_request("https://fapi.binance.com", "BTCUSDT")
    assert (oi.market, oi.endpoint, oi.url, oi.params, oi.weight, oi.symbol) == (
        "futures",
        "open_interest",
        "https://fapi.binance.com/fapi/v1/openInterest",
        {"symbol": "BTCUSDT"},
        1,
        "BTCUSDT",
    )


def test_weights() -> None:
    """Depth weights follow binance.md §4.1/§4.2; a futures limit Binance refuses is refused here."""
    assert [spot_depth_weight(n) for n in (1, 100, 101, 500, 501, 1000, 1001, 5000)] == [
        5, 5, 25, 25, 50, 50, 250, 250,
    ]  # fmt: skip
    assert [futures_depth_weight(n) for n in (5, 10, 20, 50, 100, 500, 1000)] == [2, 2, 2, 2, 5, 10, 20]
    with pytest.raises(ValueError, match="not a futures depth limit"):
        futures_depth_weight(7)


def test_retry_after() -> None:
    """Retry-After is read (any case) on 429/418 only; missing or malformed falls back to the default."""
    assert retry_after_s(429, {"Retry-After": "7"}) == 7.0
    assert retry_after_s(418, {"retry-after": "120"}) == 120.0
    assert retry_after_s(429, {}) == DEFAULT_RETRY_AFTER_S
    assert retry_after_s(429, {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}, default=5) == 5
    assert retry_after_s(429, {"Retry-After": "-3"}, default=5) == 5
    assert retry_after_s(500, {"Retry-After": "7"}) == 0.0
    assert used_weight({"x-mbx-used-weight-1m": "42"}) == 42
    assert used_weight({}) is None


def test_classify() -> None:
    """429/418 wait, 5XX and transport errors retry, other 4XX are fatal with Binance's code."""
    assert classify(200).action == "ok"
    limited = classify(429, {"Retry-After": "3"}, b'{"code":-1003,"msg":"Too much request weight used"}')
    assert (limited.action, limited.reason, limited.retry_after_s) == ("wait", "rate_limited", 3.0)
    assert (classify(418, {"Retry-After": "120"}).reason, classify(418, {}).retry_after_s) == (
        "ip_banned",
        DEFAULT_RETRY_AFTER_S,
    )
    assert (classify(503).action, classify(503).reason) == ("retry", "server_error")
    assert classify(None, transport_error="timeout") == classify(None, transport_error="timeout")
    assert classify(None, transport_error="timeout").action == "retry"
    assert classify(None, transport_error="connection_error").reason == "connection_error"
    assert classify(None, transport_error="invalid_request").action == "fatal"
    bad_symbol = classify(400, {}, b'{"code":-1121,"msg":"Invalid symbol."}')
    assert (bad_symbol.action, bad_symbol.reason, bad_symbol.detail) == (
        "fatal",
        "client_error",
        "-1121 Invalid symbol.",
    )
    bad_limit = classify(400, {}, b'{"code":-4021,"msg":"7 is not valid depth limit"}')
    assert bad_limit.action == "fatal" and bad_limit.detail.startswith("-4021")
    assert classify(403, {}, b"<html>WAF</html>").action == "fatal"
    assert classify(451).action == "fatal"


def test_backoff() -> None:
    """Backoff doubles from the initial delay, is capped, and jitter keeps it within [half, full]."""
    assert [backoff_s(n, 0.5, 30, 1.0) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert [backoff_s(n, 0.5, 30, 0.0) for n in range(3)] == [0.25, 0.5, 1]
    assert backoff_s(1000, 0.5, 30, 0.5) == 22.5


def test_body_problem() -> None:
    """Only a JSON object can be embedded in an envelope unmodified."""
    assert body_problem(b'{"openInterest":"1"}') == ""
    assert body_problem(b"<html>").startswith("body is not JSON")
    assert body_problem(b"[1,2]") == "body is not a JSON object"


# --- against the fake exchange ------------------------------------------------------------------


@pytest.fixture
def exchange() -> Iterator[FakeExchange]:
    with FakeExchange(
        port=0, spot_symbols=["BTCUSDT", "ETHUSDT"], futures_symbols=["BTCUSDT", "ETHUSDT"]
    ) as ex:
        yield ex


def _settings_for(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in base_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return load_settings()


@pytest.fixture
def rest_settings(
    settings: Settings, exchange: FakeExchange, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Settings aimed at the fake exchange, with short backoffs so retries are quick."""
    yield _settings_for(
        {
            "BINANCE_SPOT_REST_URL": exchange.spot_rest_url,
            "BINANCE_FUTURES_REST_URL": exchange.futures_rest_url,
            "REST_CONNECT_TIMEOUT_S": str(5 * TIMEOUT_FACTOR),
            "REST_READ_TIMEOUT_S": str(10 * TIMEOUT_FACTOR),
            "REST_MAX_RETRIES": "3",
            "REST_BACKOFF_INITIAL_S": "0.05",
            "REST_BACKOFF_MAX_S": str(5 * TIMEOUT_FACTOR),
            "DEPTH_SNAPSHOT_LIMIT": "100",
        },
        monkeypatch,
    )
    get_settings.cache_clear()


class RecordingSession(requests.Session):
    """A real session that also keeps every response body, to compare with what was queued."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.hooks["response"].append(lambda response, *args, **kwargs: self.bodies.append(response.content))


def frame_of(envelope: bytes) -> bytes:
    """The raw frame bytes embedded in an envelope by `make_envelope`."""
    start = envelope.index(b',"frame":') + len(b',"frame":')
    assert envelope.endswith(b"}")
    return envelope[start:-1]


def counter(client: redis.Redis, name: str) -> dict[str, int]:
    raw: dict[bytes, bytes] = client.hgetall(keys.metric(name))  # type: ignore[assignment]
    return {field.decode(): int(value) for field, value in raw.items()}


def queued(client: redis.Redis, table: str) -> list[bytes]:
    items: list[bytes] = client.lrange(keys.queue(table), 0, -1)  # type: ignore[assignment]
    return items


def test_open_interest_envelopes_carry_symbol_and_unmodified_body(
    rest_settings: Settings, redis_conn: redis.Redis
) -> None:
    """Open interest bodies land in their queue, byte for byte, with market, symbol and receive time."""
    with RecordingSession() as session:
        before_us = time.time_ns() // 1000
        summary = poll_open_interest(rest_settings, redis_conn, session, ["BTCUSDT", "ETHUSDT"])
        bodies = session.bodies
    assert (summary.ok, summary.failed) == (["BTCUSDT", "ETHUSDT"], {})
    envelopes = queued(redis_conn, "open_interest")
    assert [frame_of(raw) for raw in envelopes] == bodies
    for raw, symbol in zip(envelopes, ["BTCUSDT", "ETHUSDT"], strict=True):
        envelope = orjson.loads(raw)
        assert (envelope["market"], envelope["symbol"]) == ("futures", symbol)
        assert envelope["received_at_us"] >= before_us
        (row,) = parse_envelope("open_interest", raw).rows
        assert row[1] == symbol
    assert counter(redis_conn, "rest_requests") == {"futures|open_interest|200": 2}


def test_depth_snapshots_for_both_markets(rest_settings: Settings, redis_conn: redis.Redis) -> None:
    """Depth snapshots of each market are queued with their market and symbol and parse as rows."""
    with requests.Session() as session:
        spot = poll_depth_snapshots(rest_settings, redis_conn, session, "spot", ["BTCUSDT", "ETHUSDT"])
        futures = poll_depth_snapshots(rest_settings, redis_conn, session, "futures", ["BTCUSDT"])
    assert (spot.ok, futures.ok) == (["BTCUSDT", "ETHUSDT"], ["BTCUSDT"])
    rows = [parse_envelope("depth_snapshots", raw).rows[0] for raw in queued(redis_conn, "depth_snapshots")]
    assert [(row[1], row[2]) for row in rows] == [
        ("BTCUSDT", "spot"),
        ("ETHUSDT", "spot"),
        ("BTCUSDT", "futures"),
    ]
    assert counter(redis_conn, "rest_requests") == {"spot|depth|200": 2, "futures|depth|200": 1}


def test_rate_limit_pauses_every_client_then_succeeds(
    rest_settings: Settings, exchange: FakeExchange, redis_conn: redis.Redis
) -> None:
    """A 429 with Retry-After sets the shared pause: other clients hold off, then the call succeeds."""
    request = open_interest_request(rest_settings.binance_futures_rest_url, "BTCUSDT")
    exchange.fail_rest(429, 1, retry_after_s=3)
    with requests.Session() as session:
        first = RestClient(rest_settings.model_copy(update={"rest_max_retries": 0}), redis_conn, session)
        with pytest.raises(RateLimited) as raised:
            first.get(request)
        assert raised.value.status == 429 and raised.value.retry_after_s == 3
        pause_until_us = int(redis_conn.get(keys.rest_pause_until("futures")) or 0)
        assert pause_until_us > time.time_ns() // 1000
        assert 0 < redis_conn.pttl(keys.rest_pause_until("futures")) <= 3001
        # Another worker that will not wait is refused without sending anything.
        impatient = RestClient(rest_settings, redis_conn, session, max_wait_s=0)
        with pytest.raises(RateLimited):
            impatient.get(request)
        assert counter(redis_conn, "rest_requests") == {"futures|open_interest|429": 1}
        # The spot market is not paused by a futures 429.
        spot = RestClient(rest_settings, redis_conn, session).get(
            depth_request("spot", rest_settings.binance_spot_rest_url, "BTCUSDT", 100)
        )
        assert spot.status == 200
        # A patient worker sits the pause out, then succeeds.
        response = RestClient(rest_settings, redis_conn, session).get(request)
    assert response.status == 200
    assert response.received_at_us >= pause_until_us
    assert counter(redis_conn, "rest_requests")["futures|open_interest|200"] == 1
    assert counter(redis_conn, "rest_errors") == {"futures|open_interest|rate_limited": 1}


def test_rate_limit_inside_one_call_waits_and_retries(
    rest_settings: Settings, exchange: FakeExchange, redis_conn: redis.Redis
) -> None:
    """One call that meets a 429 waits out Retry-After itself and then returns the answer."""
    exchange.fail_rest(429, 1, retry_after_s=1)
    with requests.Session() as session:
        summary = poll_open_interest(rest_settings, redis_conn, session, ["BTCUSDT"])
    assert summary.ok == ["BTCUSDT"]
    assert counter(redis_conn, "rest_requests") == {
        "futures|open_interest|429": 1,
        "futures|open_interest|200": 1,
    }


def test_long_pause_skips_the_rest_of_the_market(
    rest_settings: Settings, exchange: FakeExchange, redis_conn: redis.Redis
) -> None:
    """A 418 ban longer than the client will wait fails the poll fast, marking every symbol rate_limited."""
    exchange.fail_rest(418, 1, retry_after_s=120)
    with requests.Session() as session:
        summary = poll_open_interest(rest_settings, redis_conn, session, ["BTCUSDT", "ETHUSDT"])
    assert (summary.ok, summary.failed) == ([], {"BTCUSDT": "rate_limited", "ETHUSDT": "rate_limited"})
    assert counter(redis_conn, "rest_requests") == {"futures|open_interest|418": 1}
    assert counter(redis_conn, "rest_errors") == {"futures|open_interest|ip_banned": 1}


def test_server_errors_are_retried(
    rest_settings: Settings, exchange: FakeExchange, redis_conn: redis.Redis
) -> None:
    """5XX answers are retried with backoff until one succeeds; past the retries they raise RestError."""
    request = open_interest_request(rest_settings.binance_futures_rest_url, "BTCUSDT")
    exchange.fail_rest(500, 2, retry_after_s=0)
    with requests.Session() as session:
        assert RestClient(rest_settings, redis_conn, session).get(request).status == 200
        assert counter(redis_conn, "rest_requests") == {
            "futures|open_interest|500": 2,
            "futures|open_interest|200": 1,
        }
        exchange.fail_rest(500, 10, retry_after_s=0)
        with pytest.raises(RestError) as raised:
            RestClient(rest_settings, redis_conn, session).get(request)
    assert raised.value.status == 500 and is_transient(raised.value)
    assert counter(redis_conn, "rest_errors") == {"futures|open_interest|server_error": 2 + 4}


def test_invalid_symbol_is_fatal_and_does_not_block_others(
    rest_settings: Settings, redis_conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """-1121 invalid symbol fails that symbol once, with one error line, and the others are queued."""
    with requests.Session() as session, caplog.at_level("ERROR", logger="collector.rest.client"):
        summary = poll_open_interest(rest_settings, redis_conn, session, ["BTCUSDT", "NOPEUSDT", "ETHUSDT"])
    assert summary.ok == ["BTCUSDT", "ETHUSDT"]
    assert list(summary.failed) == ["NOPEUSDT"] and "-1121" in summary.failed["NOPEUSDT"]
    assert redis_conn.llen(keys.queue("open_interest")) == 2
    assert counter(redis_conn, "rest_requests")["futures|open_interest|400"] == 1  # no retry
    fatal = [record.getMessage() for record in caplog.records if "rest.fatal" in record.getMessage()]
    assert len(fatal) == 1 and "symbol=NOPEUSDT" in fatal[0] and "-1121" in fatal[0]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


def test_timeouts_raise_within_the_configured_time(
    settings: Settings, silent_port: int, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that never answers costs the read timeout per attempt, then RestError (retryable)."""
    timed = _settings_for(
        {
            "BINANCE_FUTURES_REST_URL": f"http://127.0.0.1:{silent_port}",
            "REST_READ_TIMEOUT_S": "0.5",
            "REST_MAX_RETRIES": "1",
            "REST_BACKOFF_INITIAL_S": "0.05",
        },
        monkeypatch,
    )
    request = open_interest_request(timed.binance_futures_rest_url, "BTCUSDT")
    started = time.monotonic()
    with requests.Session() as session, pytest.raises(RestError) as raised:
        RestClient(timed, redis_conn, session).get(request)
    elapsed = time.monotonic() - started
    get_settings.cache_clear()
    assert raised.value.status is None and is_transient(raised.value)
    assert 2 * 0.5 * 0.9 <= elapsed < 2 * 0.5 + 0.05 + 10 * TIMEOUT_FACTOR
    assert counter(redis_conn, "rest_errors") == {"futures|open_interest|timeout": 2}


def test_unparsable_body_goes_to_the_dead_letter_list(
    settings: Settings, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 200 answer that is not JSON is dead-lettered with its reason, not queued."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>maintenance</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        local = _settings_for(
            {"BINANCE_FUTURES_REST_URL": f"http://127.0.0.1:{server.server_port}"}, monkeypatch
        )
        with requests.Session() as session:
            summary = poll_open_interest(local, redis_conn, session, ["BTCUSDT"])
    finally:
        server.shutdown()
        server.server_close()
        get_settings.cache_clear()
    assert summary.ok == [] and summary.failed["BTCUSDT"].startswith("body is not JSON")
    assert redis_conn.llen(keys.queue("open_interest")) == 0
    (letter,) = [orjson.loads(raw) for raw in redis_conn.lrange(keys.DEADLETTER, 0, -1)]
    assert (letter["source"], letter["market"], letter["symbol"], letter["frame"]) == (
        "rest",
        "futures",
        "BTCUSDT",
        "<html>maintenance</html>",
    )
    assert counter(redis_conn, "deadletters") == {"rest": 1}


# --- the task shells ----------------------------------------------------------------------------


def test_tasks_poll_the_configured_symbols(rest_settings: Settings, redis_conn: redis.Redis) -> None:
    """open_interest() and depth_snapshot() with no arguments poll every configured symbol and market."""
    from collector.tasks.rest import depth_snapshot, open_interest

    assert open_interest() == {
        "table": "open_interest",
        "market": "futures",
        "ok": ["BTCUSDT", "ETHUSDT"],
        "failed": {},
    }
    summaries = depth_snapshot()
    assert [(s["market"], s["ok"]) for s in summaries] == [
        ("spot", ["BTCUSDT", "ETHUSDT"]),
        ("futures", ["BTCUSDT", "ETHUSDT"]),
    ]
    assert depth_snapshot(market="spot", symbol="ethusdt")[0]["ok"] == ["ETHUSDT"]
    assert redis_conn.llen(keys.queue("open_interest")) == 2
    assert redis_conn.llen(keys.queue("depth_snapshots")) == 5


def test_tasks_refuse_bad_arguments_with_one_line(
    rest_settings: Settings, redis_conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed symbol or market given by hand is one error line and no request; unknown is fatal."""
    from collector.tasks.rest import depth_snapshot, open_interest

    with caplog.at_level("ERROR"):
        assert open_interest(symbol="BTC/USDT") is None
        assert depth_snapshot(market="moon") is None
    assert [r.getMessage().split(" ")[0] for r in caplog.records if r.levelname == "ERROR"] == [
        "rest.bad_symbol",
        "rest.bad_market",
    ]
    assert counter(redis_conn, "rest_requests") == {}
    with pytest.raises(RestError, match=r"every REST call failed \(1\), e.g. NOPEUSDT: "):
        open_interest(symbol="NOPEUSDT")  # Binance refused it: a failed task, not a success
    assert counter(redis_conn, "rest_requests") == {"futures|open_interest|400": 1}


def test_a_run_whose_every_call_failed_is_a_failed_task(
    rest_settings: Settings, exchange: FakeExchange, redis_conn: redis.Redis
) -> None:
    """When no symbol could be fetched the task raises (FAILURE in Flower); one success is enough."""
    from collector.tasks.rest import depth_snapshot, open_interest

    exchange.fail_rest(status=500, count=1000, retry_after_s=0)
    with pytest.raises(RestError, match="every REST call failed"):
        open_interest()
    with pytest.raises(RestError, match="every REST call failed"):
        depth_snapshot(market="spot")
    exchange.fail_rest(status=500, count=0, retry_after_s=0)
    assert open_interest()["ok"] == ["BTCUSDT", "ETHUSDT"]
