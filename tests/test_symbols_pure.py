"""The symbol universe's pure parts: exchangeInfo parsing and filtering, stream placement, pacing, lag."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import redis.asyncio

from collector.binance.exchange_info import (
    ExchangeInfoError,
    SymbolInfo,
    exchange_info_request,
    parse_exchange_info,
    quote_assets_seen,
    select_symbols,
)
from collector.binance.streams import StreamSpec, combined_url, connection_plans, stream_specs, stream_symbol
from collector.errors import ConfigError
from collector.fake.generators import synthetic_symbols
from collector.gaps.depth import DepthTracker
from collector.settings import SYMBOL_PATTERN, Settings, load_settings
from collector.streams.lag import LagStats
from collector.streams.ledger import GapLedger
from collector.streams.limits import AttemptWindow, ConnectionAttempts
from collector.streams.placement import Carried, plan_placement
from collector.streams.sink import Sink, SinkOptions
from collector.streams.state import ConnectionState
from collector.streams.subscriptions import subscription_messages
from collector.streams.symbols import preview, with_symbols

BASES = {"spot": "wss://s", "futures": "wss://f"}


@pytest.fixture(autouse=True)
def _no_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no developer .env in the settings


def _body(*rows: object) -> bytes:
    return orjson.dumps({"timezone": "UTC", "serverTime": 1, "newField": [1], "symbols": list(rows)})


# --- exchangeInfo ---------------------------------------------------------------------------------


def test_exchange_info_requests_carry_binance_weights() -> None:
    """Spot exchangeInfo weighs 20 and asks for TRADING symbols only; USD-M weighs 1."""
    spot = exchange_info_request("spot", "https://api.binance.com/")
    futures = exchange_info_request("futures", "https://fapi.binance.com")
    assert (spot.url, spot.params, spot.weight) == (
        "https://api.binance.com/api/v3/exchangeInfo",
        {"symbolStatus": "TRADING"},
        20,
    )
    assert (futures.url, futures.params, futures.weight) == (
        "https://fapi.binance.com/fapi/v1/exchangeInfo",
        {},
        1,
    )
    assert spot.endpoint == futures.endpoint == "exchange_info"


def test_exchange_info_rows_are_read_leniently() -> None:
    """Unknown keys are ignored; rows without a string symbol are skipped; a missing status reads as ''."""
    body = _body(
        {"symbol": "BTCUSDT", "status": "TRADING", "quoteAsset": "USDT", "filters": [], "new": {"x": 1}},
        {"symbol": 12, "status": "TRADING"},
        "not a row",
        {"symbol": "ETHBTC", "quoteAsset": "BTC"},
    )
    assert parse_exchange_info(body) == [
        SymbolInfo("BTCUSDT", "TRADING", "USDT"),
        SymbolInfo("ETHBTC", "", "BTC"),
    ]


@pytest.mark.parametrize("body", [b"<html>", b"[]", b'{"symbols": {}}'])
def test_exchange_info_that_is_not_binance_is_an_error(body: bytes) -> None:
    """A body that is not JSON or has no symbols list raises ExchangeInfoError."""
    with pytest.raises(ExchangeInfoError):
        parse_exchange_info(body)


def test_only_trading_symbols_of_the_asked_quotes_are_selected() -> None:
    """TRADING only, quote filter applied, sorted without repeats; unnamable symbols kept apart."""
    infos = [
        SymbolInfo("ETHUSDT", "TRADING", "USDT"),
        SymbolInfo("BTCUSDT", "TRADING", "USDT"),
        SymbolInfo("BTCUSDT", "TRADING", "USDT"),
        SymbolInfo("LUNAUSDT", "BREAK", "USDT"),
        SymbolInfo("OLDUSDT", "CANCEL_ONLY", "USDT"),
        SymbolInfo("BTCFDUSD", "TRADING", "FDUSD"),
        SymbolInfo("ETHBTC", "TRADING", "BTC"),
        SymbolInfo("BTCUSDT_261225", "TRADING", "USDT"),
        SymbolInfo("币安人生USDT", "TRADING", "USDT"),
    ]
    every = select_symbols(infos)
    assert every.symbols == ["BTCFDUSD", "BTCUSDT", "BTCUSDT_261225", "ETHBTC", "ETHUSDT"]
    assert every.unnamable == ["币安人生USDT"]
    assert select_symbols(infos, ["USDT", "FDUSD"]).symbols == [
        "BTCFDUSD",
        "BTCUSDT",
        "BTCUSDT_261225",
        "ETHUSDT",
    ]
    assert select_symbols(infos, ["EUR"]).symbols == []
    assert quote_assets_seen(infos) == ["BTC", "FDUSD", "USDT"]


# --- settings -------------------------------------------------------------------------------------


def test_quote_assets_are_parsed_for_an_all_market() -> None:
    """SPOT_SYMBOLS=ALL with SPOT_QUOTE_ASSETS=usdt, fdusd gives the upper-case filter."""
    settings = load_settings(
        spot_symbols="all", spot_quote_assets="usdt, fdusd", symbols_refresh_interval_s=5
    )
    assert settings.symbols_all("spot") and not settings.symbols_all("futures")
    assert settings.quote_assets("spot") == ["USDT", "FDUSD"] and settings.quote_assets("futures") == []
    assert Settings().symbols_refresh_interval_s == 600


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"futures_quote_assets": "USDT"},
            "configuration error: FUTURES_QUOTE_ASSETS: only applies with FUTURES_SYMBOLS=ALL "
            "(got FUTURES_SYMBOLS=BTCUSDT,ETHUSDT)",
        ),
        ({"spot_symbols": "ALL,BTCUSDT"}, "SPOT_SYMBOLS: ALL stands alone"),
        ({"spot_symbols": "ALL", "spot_quote_assets": "US-DT"}, "SPOT_QUOTE_ASSETS: 'US-DT' is not an asset"),
        ({"symbols_refresh_interval_s": 0}, "SYMBOLS_REFRESH_INTERVAL_S"),
    ],
)
def test_bad_symbol_universe_settings_are_one_line(values: dict[str, object], message: str) -> None:
    """A quote filter without ALL, ALL in a list, a bad asset or interval: one ConfigError line."""
    with pytest.raises(ConfigError) as raised:
        load_settings(**values)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_resolved_lists_plan_like_configured_ones() -> None:
    """with_symbols() puts a resolved list where the stream planning functions read it."""
    settings = load_settings(spot_symbols="ALL", futures_symbols="ALL")
    resolved = with_symbols(settings, {"spot": ["BTCUSDT"], "futures": ["ETHUSDT"]})
    names = [spec.name for spec in stream_specs(resolved)]
    assert names == [
        "btcusdt@aggTrade",
        "btcusdt@depth@100ms",
        "ethusdt@aggTrade",
        "ethusdt@depth@500ms",
        "!markPrice@arr@1s",
        "!forceOrder@arr",
    ]
    assert settings.spot_symbols == ["ALL"]  # the original is untouched


# --- placement ------------------------------------------------------------------------------------


def _spot(*names: str) -> list[StreamSpec]:
    return [StreamSpec(name, "spot", "spot", "agg_trades") for name in names]


def test_unchanged_streams_stay_and_new_ones_fill_room_first() -> None:
    """Removed streams leave their connection; new ones take the room left, in connection order."""
    carried = [
        Carried("spot-0", "spot", "spot", ("a@aggTrade", "b@aggTrade", "c@aggTrade")),
        Carried("spot-1", "spot", "spot", ("d@aggTrade",)),
    ]
    placement = plan_placement(
        carried, _spot("a@aggTrade", "c@aggTrade", "d@aggTrade", "e@aggTrade", "f@aggTrade"), 3, BASES
    )
    assert [(c.connection_id, c.streams, c.added, c.removed) for c in placement.changes] == [
        ("spot-0", ("a@aggTrade", "c@aggTrade", "e@aggTrade"), ("e@aggTrade",), ("b@aggTrade",)),
        ("spot-1", ("d@aggTrade", "f@aggTrade"), ("f@aggTrade",), ()),
    ]
    assert placement.changes[0].url == combined_url(
        "wss://s", "spot", ("a@aggTrade", "c@aggTrade", "e@aggTrade")
    )
    assert placement.opened == () and placement.closed == ()


def test_full_connections_make_new_ones_and_empty_ones_close() -> None:
    """Past the cap new connections open (fresh ids, never reused); a connection left empty closes."""
    carried = [
        Carried("spot-0", "spot", "spot", ("a@aggTrade", "b@aggTrade")),
        Carried("spot-1", "spot", "spot", ("c@aggTrade",)),
    ]
    wanted = _spot("a@aggTrade", "b@aggTrade", "x@aggTrade", "y@aggTrade", "z@aggTrade")
    placement = plan_placement(carried, wanted, 2, BASES, taken_ids={"spot-2"})
    assert [(c.connection_id, c.streams, c.removed) for c in placement.changes] == [
        ("spot-1", ("x@aggTrade", "y@aggTrade"), ("c@aggTrade",))
    ]
    assert [(p.connection_id, p.streams) for p in placement.opened] == [("spot-3", ("z@aggTrade",))]
    assert placement.opened[0].url == "wss://s/stream?streams=z@aggTrade"
    shrunk = plan_placement(carried, _spot("a@aggTrade", "b@aggTrade"), 2, BASES)
    assert (shrunk.changes, shrunk.opened, shrunk.closed) == ((), (), ("spot-1",))


def test_families_never_share_a_connection() -> None:
    """A new USD-M depth stream goes to a /public connection, an aggTrade to a /market one."""
    carried = [
        Carried("futures-public-0", "futures", "public", ("xxusdt@depth@500ms",)),
        Carried("futures-market-0", "futures", "market", ("xxusdt@aggTrade", "!forceOrder@arr")),
    ]
    settings = load_settings(futures_streams="aggTrade,depth@500ms,forceOrder")
    wanted = stream_specs(with_symbols(settings, {"spot": [], "futures": ["XXUSDT", "YYUSDT"]}))
    placement = plan_placement(carried, wanted, 10, BASES)
    changes = {c.connection_id: c.added for c in placement.changes}
    assert changes == {"futures-public-0": ("yyusdt@depth@500ms",), "futures-market-0": ("yyusdt@aggTrade",)}
    assert placement.changes[0].url.startswith("wss://f/market/stream?streams=")


def test_nothing_changed_is_an_empty_placement() -> None:
    """The same streams as carried: nothing to do."""
    settings = load_settings()
    plans = connection_plans(settings)
    carried = [Carried(p.connection_id, p.market, p.family, p.streams) for p in plans]
    assert plan_placement(carried, stream_specs(settings), 200, BASES).empty


def test_subscription_messages_unsubscribe_first_in_chunks() -> None:
    """UNSUBSCRIBE before SUBSCRIBE (the cap is never passed), at most N names per message."""
    messages = subscription_messages({"a", "b", "c"}, ["a", "d", "e", "f"], max_names=2)
    assert messages == [
        ("UNSUBSCRIBE", ("b", "c")),
        ("SUBSCRIBE", ("d", "e")),
        ("SUBSCRIBE", ("f",)),
    ]
    assert subscription_messages({"a"}, ["a"]) == []


def test_stream_symbol_names_the_followed_symbol() -> None:
    """`btcusdt_261225@depth` follows BTCUSDT_261225; all-market streams follow none."""
    assert stream_symbol("btcusdt_261225@depth") == "BTCUSDT_261225"
    assert stream_symbol("!markPrice@arr@1s") is None


# --- limits and lag -------------------------------------------------------------------------------


def test_attempts_past_the_window_limit_wait_their_turn() -> None:
    """Within the limit no wait; past it each attempt gets the next free slot of the window."""
    window = AttemptWindow(limit=3, window_s=10.0)
    assert [window.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    # The next three slots open at t=10, when the first three leave the window; then t=20.
    assert [window.reserve(1.0) for _ in range(4)] == pytest.approx([9.0, 9.0, 9.0, 19.0])
    assert window.reserve(40.0) == 0.0
    attempts = ConnectionAttempts(limit=1, window_s=5.0)
    assert (attempts.reserve("spot", 0.0), attempts.reserve("futures", 0.0)) == (0.0, 0.0)
    assert attempts.reserve("spot", 1.0) == pytest.approx(4.0)


def test_lag_stats_keep_the_longest_block_and_count_the_long_ones() -> None:
    """record() keeps the maximum and says which blocks passed the threshold."""
    stats = LagStats(warn_ms=100.0)
    assert [stats.record(ms) for ms in (3.0, 150.0, 20.0, 101.0)] == [False, True, False, True]
    snapshot = stats.snapshot()
    assert (snapshot.max_block_ms, snapshot.blocks_over, snapshot.block_warn_ms) == (150.0, 2, 100.0)


# --- ledger and fake ------------------------------------------------------------------------------


def test_a_forgotten_symbol_gets_no_more_snapshots() -> None:
    """forget() returns the open gaps; a snapshot answer arriving afterwards changes nothing."""
    tracker = DepthTracker()
    tracker.on_event("spot", "BTCUSDT", 10, 12, None, 1)
    decisions = tracker.on_event("spot", "BTCUSDT", 20, 22, None, 2)
    assert decisions.fetch == [("spot", "BTCUSDT")]
    gaps = tracker.forget("spot", "BTCUSDT")
    assert len(gaps) == 1 and tracker.open_gaps() == []
    assert tracker.on_snapshot("spot", "BTCUSDT", None, 3).fetch == []
    assert ("spot", "BTCUSDT") not in tracker.symbols


def test_removed_streams_leave_nothing_open_in_the_ledger() -> None:
    """A delisted stream's outage and depth gap are closed and queued; none stays in the open set."""
    asyncio.run(_remove_streams_with_open_gaps())


async def _remove_streams_with_open_gaps() -> None:
    sink = Sink(redis.asyncio.Redis(), SinkOptions(1.0, 1000, 10**6))

    async def no_fetch(market: str, symbol: str) -> None:
        return None

    ledger = GapLedger(sink, no_fetch)
    state = ConnectionState("spot-0", "spot", "spot", "u", ("btcusdt@depth@100ms", "btcusdt@aggTrade"))
    ledger.stream_silent(state, "btcusdt@depth@100ms", 5)
    ledger.on_depth("spot", "btcusdt@depth@100ms", {"s": "BTCUSDT", "U": 10, "u": 12}, 6, "spot-0#1")
    ledger.on_depth("spot", "btcusdt@depth@100ms", {"s": "BTCUSDT", "U": 20, "u": 22}, 7, "spot-0#1")
    assert len(ledger.open_gap_fields()) == 2
    ledger.streams_removed("spot", ["btcusdt@depth@100ms", "btcusdt@aggTrade"])
    assert ledger.open_gap_fields() == {}
    closed_outage = orjson.loads(sink.buffered_envelopes("stream_gaps")[-1])["frame"]
    closed_gap = orjson.loads(sink.buffered_envelopes("depth_gaps")[-1])["frame"]
    assert closed_outage["ended_at_us"] is not None
    assert closed_gap["resynced_at_us"] is not None and closed_gap["resync_update_id"] is None


def test_made_up_symbols_are_valid_distinct_and_quoted_in_turn() -> None:
    """1,500 spot and 500 USD-M made-up symbols: valid names, no repeats, quotes alternating."""
    spot, futures = synthetic_symbols("spot", 1500), synthetic_symbols("futures", 500)
    assert len(set(spot)) == 1500 and len(set(futures)) == 500
    assert all(SYMBOL_PATTERN.match(symbol) for symbol in spot + futures)
    assert spot[:2] == ("ZAAAUSDT", "ZAABFDUSD") and futures[:2] == ("ZAAAUSDT", "ZAABUSDC")
    assert sum(symbol.endswith("FDUSD") for symbol in spot) == 750


def test_log_previews_are_truncated() -> None:
    """At most N names, then a count of the rest."""
    assert preview([]) == "-"
    assert preview(["A", "B"], limit=3) == "A,B"
    assert preview(["A", "B", "C", "D"], limit=2) == "A,B,...(+2)"
