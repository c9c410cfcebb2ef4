"""Liquidation alert rules, pure: liquidations in, alerts out, over plain dataclasses.

Two rules, each with a per-(symbol, rule) cooldown so a cascade is one line, not a thousand:

- `single`: one liquidation whose notional (quantity * price) reaches ALERT_MIN_NOTIONAL_USD.
- `window`: a symbol's liquidations with exchange time in (T - ALERT_WINDOW_S, T] sum to at least
  ALERT_WINDOW_NOTIONAL_USD, where T is the liquidation that completes the sum.

The clock is the exchange's liquidation time (`o.T`), never the wall clock, and a window counts only
liquidations ingested no later than the one being judged (by `ingest_seq`). So evaluating the same
rows again, in one batch or in many, decides exactly the same alerts with the same keys.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

Rule = Literal["single", "window"]
RULES: tuple[Rule, ...] = ("single", "window")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Liquidation:
    """One stored `force_orders` row, as the rules need it."""

    ingest_seq: int  # commit order in `force_orders`
    symbol: str  # o.s
    side: str  # o.S (SELL = a long position was force-closed)
    quantity: Decimal  # o.q
    price: Decimal  # o.p
    time_us: int  # o.T, the exchange's trade time, in µs since the epoch

    @property
    def notional(self) -> Decimal:
        return self.quantity * self.price


@dataclass(frozen=True)
class Thresholds:
    """The alert settings the rules read; times in µs, amounts in USD."""

    min_notional_usd: Decimal
    window_us: int
    window_notional_usd: Decimal
    cooldown_us: int

    @classmethod
    def from_settings(cls, settings: Any) -> Thresholds:
        """From anything with the ALERT_* fields of `collector.settings.Settings`."""
        return cls(
            min_notional_usd=Decimal(str(settings.alert_min_notional_usd)),
            window_us=round(settings.alert_window_s * 1_000_000),
            window_notional_usd=Decimal(str(settings.alert_window_notional_usd)),
            cooldown_us=round(settings.alert_cooldown_s * 1_000_000),
        )


@dataclass(frozen=True)
class Alert:
    """One decided alert. `alert_key` names the liquidation that fired it, so it is decided once."""

    alert_key: str
    rule: Rule
    symbol: str
    side: str
    quantity: Decimal
    price: Decimal
    notional: Decimal  # of the liquidation that fired it
    time_us: int  # its exchange time
    window_notional: Decimal | None  # the window's sum (rule `window` only)
    line: str  # the alert log line, without the newline


def plain(value: Decimal) -> str:
    """A decimal without exponent or trailing zeros: 100000, 97500.15, 0.014."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def iso_ms(time_us: int) -> str:
    """`2026-11-24T12:00:01.234Z` (Binance's times are milliseconds)."""
    moment = _EPOCH + timedelta(microseconds=time_us)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _key_time(time_us: int) -> str:
    """Binance's `T` in milliseconds; a sub-millisecond part (hand-made rows only) as a fraction."""
    ms, rest = divmod(time_us, 1000)
    return str(ms) if rest == 0 else f"{ms}.{rest:03d}"


def alert_key(rule: Rule, liquidation: Liquidation) -> str:
    """`<rule>|<symbol>|<side>|<T ms>|<price>|<qty>`: the liquidation's natural key, per rule."""
    return "|".join(
        (
            rule,
            liquidation.symbol,
            liquidation.side,
            _key_time(liquidation.time_us),
            plain(liquidation.price),
            plain(liquidation.quantity),
        )
    )


def format_line(
    rule: Rule, liquidation: Liquidation, thresholds: Thresholds, key: str, window_notional: Decimal | None
) -> str:
    """One readable line; it ends with ` key=<alert_key>` so the log can be searched for it."""
    if rule == "single":
        condition = f"single(>={plain(thresholds.min_notional_usd)})"
    else:
        window_s = plain(Decimal(thresholds.window_us) / 1_000_000)
        condition = f"window(>={plain(thresholds.window_notional_usd)} in {window_s}s)"
    parts = [
        iso_ms(liquidation.time_us),
        "LIQUIDATION",
        liquidation.symbol,
        liquidation.side,
        f"qty={plain(liquidation.quantity)}",
        f"price={plain(liquidation.price)}",
        f"notional={plain(liquidation.notional)} USD",
        f"rule={condition}",
    ]
    if window_notional is not None:
        parts.append(f"window_notional={plain(window_notional)} USD")
    parts.append(f"key={key}")
    return " ".join(parts)


def _make_alert(
    rule: Rule, liquidation: Liquidation, thresholds: Thresholds, window_notional: Decimal | None = None
) -> Alert:
    key = alert_key(rule, liquidation)
    return Alert(
        alert_key=key,
        rule=rule,
        symbol=liquidation.symbol,
        side=liquidation.side,
        quantity=liquidation.quantity,
        price=liquidation.price,
        notional=liquidation.notional,
        time_us=liquidation.time_us,
        window_notional=window_notional,
        line=format_line(rule, liquidation, thresholds, key, window_notional),
    )


class _SymbolHistory:
    """One symbol's liquidations sorted by exchange time, for window sums by bisection."""

    def __init__(self, rows: Iterable[Liquidation]) -> None:
        self._rows = sorted(rows, key=lambda row: (row.time_us, row.ingest_seq))
        self._times = [row.time_us for row in self._rows]

    def window_sum(self, liquidation: Liquidation, window_us: int) -> Decimal:
        """Notional in (T - window, T], counting only rows ingested no later than `liquidation`."""
        start = bisect_right(self._times, liquidation.time_us - window_us)
        end = bisect_right(self._times, liquidation.time_us)
        return sum(
            (row.notional for row in self._rows[start:end] if row.ingest_seq <= liquidation.ingest_seq),
            Decimal(0),
        )


def window_sum(liquidation: Liquidation, known: Iterable[Liquidation], window_us: int) -> Decimal:
    """Notional of `liquidation`'s symbol in (T - window, T], counting rows ingested up to it."""
    return _SymbolHistory(row for row in known if row.symbol == liquidation.symbol).window_sum(
        liquidation, window_us
    )


def evaluate(
    new_liquidations: Iterable[Liquidation],
    recent_liquidations: Iterable[Liquidation],
    last_alert_times: Mapping[tuple[str, str], int],
    thresholds: Thresholds,
) -> list[Alert]:
    """The alerts that `new_liquidations` fire, in ingest order.

    `recent_liquidations`: rows already evaluated that may fall in a window of a new one.
    `last_alert_times`: (symbol, rule) -> exchange time (µs) of the latest alert already decided.
    An alert for (symbol, rule) is suppressed while its liquidation time is before the last one's
    time + ALERT_COOLDOWN_S; that includes a straggler older than the last alert.
    """
    new = sorted(new_liquidations, key=lambda row: row.ingest_seq)
    unique = {row.ingest_seq: row for row in (*recent_liquidations, *new)}  # a row given twice counts once
    rows_by_symbol: dict[str, list[Liquidation]] = defaultdict(list)
    for row in unique.values():
        rows_by_symbol[row.symbol].append(row)
    history = {symbol: _SymbolHistory(rows) for symbol, rows in rows_by_symbol.items()}
    last = dict(last_alert_times)
    alerts: list[Alert] = []
    for liquidation in new:
        for rule in RULES:
            if rule == "single":
                fired = liquidation.notional >= thresholds.min_notional_usd
                total = None
            else:
                total = history[liquidation.symbol].window_sum(liquidation, thresholds.window_us)
                fired = total >= thresholds.window_notional_usd
            if not fired:
                continue
            previous = last.get((liquidation.symbol, rule))
            if previous is not None and liquidation.time_us < previous + thresholds.cooldown_us:
                continue
            alerts.append(_make_alert(rule, liquidation, thresholds, total))
            last[(liquidation.symbol, rule)] = max(previous or liquidation.time_us, liquidation.time_us)
    return alerts
