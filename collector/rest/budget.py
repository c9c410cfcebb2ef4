"""The REST weight plan, pure: what the scheduled polls need per minute, what they may use, and how far
their intervals must stretch to fit.

Binance counts request weight per IP and per UTC clock minute (binance.md §4.5): spot 6,000, USD-M
2,400, or what exchangeInfo's `rateLimits` announces (`collector.rest.planner` fetches it hourly). A
429 answers the first request past it, and going on after a 429 earns a 418 ban of 2 minutes to 3
days. Each market's minute is therefore divided up front:

    | share | who |
    |---|---|
    | REST_WEIGHT_MARGIN (10 %) | nobody: other users of the IP, and clock skew at the minute's edge |
    | RESYNC_SHARE (25 %) | kept for resync snapshots after a depth gap (they may also use what polls leave) |
    | the rest (65 %) | scheduled polls: open interest, depth snapshots (and the exchangeInfo refresh) |

The scheduled polls are planned to fill at most PLAN_FILL of their share, so evenly spread polls
never meet the gate's limit in a normal minute. When the configured symbols and intervals need more
than that, every scheduled interval of the market stretches by the same factor and the plan says so
(`MarketPlan.describe`): slower polls beat a ban.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from collector.binance.rest import (
    FUTURES_WEIGHT_PER_MINUTE,
    OPEN_INTEREST_WEIGHT,
    SPOT_WEIGHT_PER_MINUTE,
    Market,
    futures_depth_weight,
    spot_depth_weight,
)
from collector.settings import Settings

PollKind = Literal["open_interest", "depth_snapshots"]
Priority = Literal["scheduled", "resync"]

WEIGHT_PER_MINUTE: Final[dict[Market, int]] = {
    "spot": SPOT_WEIGHT_PER_MINUTE,
    "futures": FUTURES_WEIGHT_PER_MINUTE,
}
RESYNC_SHARE: Final = 0.25
PLAN_FILL: Final = 0.9


@dataclass(frozen=True)
class PollPlan:
    """One kind of scheduled poll on one market: every symbol once per `interval_s`."""

    kind: PollKind
    market: Market
    symbols: int
    weight: int  # per call
    configured_interval_s: float
    interval_s: float  # after stretching

    @property
    def spacing_s(self) -> float:
        """Time between two consecutive calls, so the symbols are spread evenly over the interval."""
        return self.interval_s / self.symbols if self.symbols else self.interval_s

    @property
    def needed_1m(self) -> float:
        return self.symbols * self.weight * 60 / self.configured_interval_s


@dataclass(frozen=True)
class MarketPlan:
    """The weight plan of one market's scheduled polls."""

    market: Market
    limit_1m: int
    margin: float
    polls: tuple[PollPlan, ...]

    @property
    def resync_limit_1m(self) -> int:
        return gate_limit(self.market, self.margin, "resync", self.limit_1m)

    @property
    def scheduled_limit_1m(self) -> int:
        return gate_limit(self.market, self.margin, "scheduled", self.limit_1m)

    @property
    def available_1m(self) -> float:
        """What the plan lets scheduled polls use on average."""
        return self.scheduled_limit_1m * PLAN_FILL

    @property
    def needed_1m(self) -> float:
        """What the configured intervals would need."""
        return sum(poll.needed_1m for poll in self.polls)

    @property
    def stretch(self) -> float:
        return stretch_factor(self.needed_1m, self.available_1m)

    @property
    def symbols(self) -> int:
        return max((poll.symbols for poll in self.polls), default=0)

    def poll(self, kind: PollKind) -> PollPlan | None:
        return next((poll for poll in self.polls if poll.kind == kind), None)

    def describe(self) -> str:
        """One line for the operator: the numbers, and what was stretched."""
        head = (
            f"rest.plan market={self.market} symbols={self.symbols} "
            f"needed_1m={self.needed_1m:.0f} available_1m={self.available_1m:.0f} "
            f"limit_1m={self.limit_1m}"
        )
        if self.stretch <= 1:
            return head + " stretch=1 (the configured intervals fit)"
        intervals = " ".join(
            f"{poll.kind}={poll.configured_interval_s:g}s->{poll.interval_s:.0f}s" for poll in self.polls
        )
        return (
            f"{head} stretch={self.stretch:.2f}: the configured intervals need more weight than the "
            f"scheduled share of Binance's limit, so they are stretched: {intervals}"
        )

    def as_record(self, updated_us: int) -> dict[str, object]:
        """The JSON kept in Redis (`collector.queue.keys.REST_PLAN`) for /metrics and status."""
        return {
            "market": self.market,
            "limit_1m": self.limit_1m,
            "scheduled_limit_1m": self.scheduled_limit_1m,
            "needed_1m": round(self.needed_1m, 1),
            "available_1m": round(self.available_1m, 1),
            "stretch": round(self.stretch, 3),
            "intervals_s": {poll.kind: round(poll.interval_s, 1) for poll in self.polls},
            "symbols": self.symbols,
            "updated_us": updated_us,
        }


def stretch_factor(needed_1m: float, available_1m: float) -> float:
    """How much longer every interval must be for `needed_1m` to fit in `available_1m` (at least 1)."""
    if available_1m <= 0:
        return math.inf if needed_1m > 0 else 1.0
    return max(1.0, needed_1m / available_1m)


def depth_weight(market: Market, limit: int) -> int:
    return spot_depth_weight(limit) if market == "spot" else futures_depth_weight(limit)


def plan_market(settings: Settings, market: Market, symbols: int, limit_1m: int | None = None) -> MarketPlan:
    """The plan of `market`'s scheduled polls for `symbols` symbols at the configured intervals,
    within `limit_1m` (the exchange's announced limit; Binance's documented one when None)."""
    wanted: list[tuple[PollKind, int, float]] = []
    if market == "futures":
        wanted.append(("open_interest", OPEN_INTEREST_WEIGHT, settings.open_interest_interval_s))
    wanted.append(
        (
            "depth_snapshots",
            depth_weight(market, settings.depth_snapshot_limit),
            settings.depth_snapshot_interval_s,
        )
    )
    limit = WEIGHT_PER_MINUTE[market] if limit_1m is None else limit_1m
    unstretched = MarketPlan(
        market,
        limit,
        settings.rest_weight_margin,
        tuple(PollPlan(kind, market, symbols, weight, every, every) for kind, weight, every in wanted),
    )
    factor = unstretched.stretch
    if factor <= 1:
        return unstretched
    return MarketPlan(
        market,
        limit,
        settings.rest_weight_margin,
        tuple(
            PollPlan(
                poll.kind, market, symbols, poll.weight, poll.configured_interval_s, poll.interval_s * factor
            )
            for poll in unstretched.polls
        ),
    )


def gate_limit(market: Market, margin: float, priority: Priority, limit_1m: int | None = None) -> int:
    """The minute's weight a request of `priority` may bring `market` up to: resyncs up to the
    margin, scheduled polls up to the margin and the resync share. `limit_1m` is the exchange's
    announced limit (exchangeInfo `rateLimits`); Binance's documented one when None."""
    kept = margin if priority == "resync" else margin + RESYNC_SHARE
    return math.floor((WEIGHT_PER_MINUTE[market] if limit_1m is None else limit_1m) * (1 - kept))


def minute_of(now_s: float) -> int:
    """Binance's weight window: the UTC clock minute (binance.md §4.5)."""
    return int(now_s // 60)


def seconds_to_next_minute(now_s: float) -> float:
    return 60 - now_s % 60
