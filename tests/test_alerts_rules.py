"""The pure liquidation alert rules: single, window, cooldown, deterministic keys and lines."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import orjson

from collector.alerts.rules import Liquidation, Thresholds, evaluate, iso_ms, plain, window_sum
from collector.queue.envelope import make_envelope, parse_envelope

T0_MS = int(datetime(2026, 11, 24, 12, 0, 1, 234000, tzinfo=UTC).timestamp() * 1000)
T0 = T0_MS * 1000  # µs

THRESHOLDS = Thresholds(
    min_notional_usd=Decimal(50_000),
    window_us=60_000_000,
    window_notional_usd=Decimal(200_000),
    cooldown_us=300_000_000,
)


def liq(
    seq: int, qty: str, price: str, t_us: int = T0, symbol: str = "BTCUSDT", side: str = "SELL"
) -> Liquidation:
    return Liquidation(seq, symbol, side, Decimal(qty), Decimal(price), t_us)


def test_single_alert_line_and_key() -> None:
    """A liquidation at or above the single threshold fires one alert with the documented line."""
    alerts = evaluate([liq(1, "1.5", "65000.1")], [], {}, THRESHOLDS)
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.rule == "single"
    assert alert.notional == Decimal("97500.15")
    assert alert.alert_key == f"single|BTCUSDT|SELL|{T0_MS}|65000.1|1.5"
    assert alert.line == (
        "2026-11-24T12:00:01.234Z LIQUIDATION BTCUSDT SELL qty=1.5 price=65000.1 "
        f"notional=97500.15 USD rule=single(>=50000) key=single|BTCUSDT|SELL|{T0_MS}|65000.1|1.5"
    )


def test_below_threshold_is_quiet() -> None:
    """Liquidations below both thresholds fire nothing; exactly the threshold fires."""
    assert evaluate([liq(1, "1", "49999.99")], [], {}, THRESHOLDS) == []
    assert [a.rule for a in evaluate([liq(1, "1", "50000")], [], {}, THRESHOLDS)] == ["single"]


def test_window_sums_the_symbol_over_the_window() -> None:
    """Small liquidations of one symbol summing to the window threshold within the window fire `window`."""
    rows = [liq(i + 1, "1", "45000", T0 + i * 10_000_000) for i in range(5)]  # 45k each, 10 s apart
    alerts = evaluate(rows, [], {}, THRESHOLDS)
    assert [(a.rule, a.time_us) for a in alerts] == [("window", T0 + 40_000_000)]
    assert alerts[0].window_notional == Decimal(225_000)
    assert alerts[0].alert_key == f"window|BTCUSDT|SELL|{T0_MS + 40_000}|45000|1"
    assert "rule=window(>=200000 in 60s) window_notional=225000 USD" in alerts[0].line


def test_window_excludes_old_rows_and_other_symbols() -> None:
    """Rows at or before T-window, and other symbols' rows, do not count toward the window."""
    old = liq(1, "1", "45000", T0 - 60_000_000)  # exactly T - window: outside (T-window, T]
    other = liq(2, "10", "45000", T0, symbol="ETHUSDT")  # 450k, but another symbol
    rows = [liq(3 + i, "1", "45000", T0 + i) for i in range(4)]  # 180k in BTCUSDT
    alerts = evaluate(rows, [old, other], {}, THRESHOLDS)
    assert alerts == []
    assert window_sum(rows[-1], [old, other, *rows], THRESHOLDS.window_us) == Decimal(180_000)


def test_recent_rows_count_toward_the_window() -> None:
    """Rows already evaluated (recent) complete the window sum of a new row."""
    recent = [liq(i + 1, "1", "45000", T0 + i) for i in range(4)]
    alerts = evaluate([liq(5, "1", "45000", T0 + 10)], recent, {}, THRESHOLDS)
    assert [a.rule for a in alerts] == ["window"]


def test_cooldown_suppresses_a_cascade() -> None:
    """After an alert for (symbol, rule), no new one for that pair until the cooldown has passed."""
    rows = [liq(i + 1, "2", "50000", T0 + i * 1_000_000) for i in range(100)]  # 100 x 100k, 1 s apart
    rows.append(liq(101, "2", "50000", T0 + 300_000_000))  # one cooldown after the first single
    rows.append(liq(102, "2", "50000", T0 + 301_000_000))  # one cooldown after the first window
    alerts = evaluate(rows, [], {}, THRESHOLDS)
    assert [(a.rule, a.time_us) for a in alerts] == [
        ("single", T0),
        ("window", T0 + 1_000_000),
        ("single", T0 + 300_000_000),
        ("window", T0 + 301_000_000),
    ]


def test_cooldown_is_per_symbol_and_uses_stored_alert_times() -> None:
    """Another symbol is not silenced; a stored last alert time silences the same pair."""
    last = {("BTCUSDT", "single"): T0 - 1_000_000}
    rows = [liq(1, "2", "50000"), liq(2, "2", "50000", symbol="ETHUSDT")]
    alerts = evaluate(rows, [], last, THRESHOLDS)
    assert [(a.symbol, a.rule) for a in alerts] == [("ETHUSDT", "single")]


def test_decisions_do_not_depend_on_batching() -> None:
    """Evaluating rows in one batch or one at a time decides the same alerts (replays agree)."""
    rows = [liq(i + 1, "1", str(30000 + 7000 * (i % 5)), T0 + i * 7_000_000) for i in range(60)]
    rows += [liq(100 + i, "3", "40000", T0 + i * 90_000_000, symbol="ETHUSDT") for i in range(10)]
    rows.sort(key=lambda r: r.ingest_seq)
    whole = evaluate(rows, [], {}, THRESHOLDS)
    piecewise = []
    last: dict[tuple[str, str], int] = {}
    for index, row in enumerate(rows):
        for alert in evaluate([row], rows[:index], last, THRESHOLDS):
            piecewise.append(alert)
            last[(alert.symbol, alert.rule)] = max(last.get((alert.symbol, alert.rule), 0), alert.time_us)
    assert [a.alert_key for a in whole] == [a.alert_key for a in piecewise]
    assert [a.line for a in whole] == [a.line for a in piecewise]
    assert whole == evaluate(list(reversed(rows)), [], {}, THRESHOLDS)


def test_window_counts_only_rows_ingested_before() -> None:
    """A late row with an earlier exchange time does not change an earlier row's window decision."""
    early = [liq(1, "1", "45000", T0), liq(2, "1", "45000", T0 + 1), liq(3, "1", "45000", T0 + 2)]
    late = liq(4, "1", "45000", T0 + 1)  # ingested last, exchange time in the middle
    alerts = evaluate([*early, late], [], {}, THRESHOLDS)
    assert alerts == []
    assert window_sum(early[2], [*early, late], THRESHOLDS.window_us) == Decimal(135_000)
    fourth = liq(5, "1", "45000", T0 + 3)
    assert [a.rule for a in evaluate([fourth], [*early, late], {}, THRESHOLDS)] == ["window"]


def test_keys_are_deterministic() -> None:
    """The same liquidation always gets the same key; equal numbers written differently agree."""
    a = evaluate([liq(1, "1.50", "65000.10")], [], {}, THRESHOLDS)
    b = evaluate([liq(9, "1.5", "65000.1")], [], {}, THRESHOLDS)
    assert a[0].alert_key == b[0].alert_key == f"single|BTCUSDT|SELL|{T0_MS}|65000.1|1.5"


def test_thresholds_from_settings_like_object() -> None:
    """Thresholds read the ALERT_* fields of any settings-like object, converting units."""

    class Like:
        alert_min_notional_usd = 100_000.0
        alert_window_s = 1.5
        alert_window_notional_usd = 1_000_000
        alert_cooldown_s = 0

    thresholds = Thresholds.from_settings(Like())
    assert thresholds == Thresholds(Decimal("100000.0"), 1_500_000, Decimal("1000000"), 0)
    assert plain(thresholds.min_notional_usd) == "100000"


def test_formatting_helpers() -> None:
    """Times print as ISO milliseconds in UTC; decimals print without exponent or trailing zeros."""
    assert iso_ms(T0) == "2026-11-24T12:00:01.234Z"
    assert plain(Decimal("1E+5")) == "100000"
    assert plain(Decimal("0.01400")) == "0.014"
    assert plain(Decimal("0")) == "0"


def test_coin_m_liquidations_never_reach_the_rules() -> None:
    """COIN-M rows (st=2) of `!forceOrder@arr` are filtered when parsed, so they cannot alert."""
    event = {
        "e": "forceOrder",
        "E": T0_MS,
        "st": 2,
        "o": {"s": "BTCUSD_PERP", "S": "SELL", "q": "1000", "p": "65000", "T": T0_MS},
    }
    frame = orjson.dumps({"stream": "!forceOrder@arr", "data": event})
    parsed = parse_envelope("force_orders", make_envelope("futures", T0, frame))
    assert parsed.rows == [] and parsed.skipped_coin_m == 1
