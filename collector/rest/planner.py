"""Scheduled REST polls, spread evenly over their intervals and kept inside the weight budget.

Beat sends a tick every REST_POLL_TICK_S (`collector.tasks.rest.poll_due`); any worker of the `rest`
pool may run it. A tick:
1. plans each market from the symbols it records (`collector.rest.budget.plan_market`), and
   announces a plan that changed, with its numbers (WARNING when the intervals had to stretch);
2. claims, per poll kind and market, the calls that are due, together with their weight, in one
   Redis script (`collector.queue.rest_weight.CLAIM_POLLS_SCRIPT`): two ticks never claim the same
   call, and no claim passes the scheduled share of the minute's weight;
3. sends the claimed calls a few at a time, and queues each body for the drain.

Nothing in a tick sleeps: a market paused by a 429/418 is skipped until the pause ends, a spent
minute leaves the calls due for the next tick, and a call that fails is given up (one WARNING per
tick) and comes round again in the next cycle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

import orjson
import redis
import requests

from collector.binance.exchange_info import rate_limits_request, request_weight_limit_1m
from collector.binance.rest import Market, RestRequest, depth_request, open_interest_request
from collector.errors import RateLimited, RestError
from collector.queue import keys
from collector.queue.rest_weight import RestWeight, announce_limit, announced_limit, now_us, used_weight
from collector.queue.summary import SharedSummary
from collector.queue.symbols import current_symbols
from collector.rest.budget import MarketPlan, PollPlan, minute_of, plan_market
from collector.rest.client import RestClient
from collector.rest.poll import queue_body
from collector.settings import Settings

logger = logging.getLogger(__name__)

MARKETS: Final[tuple[Market, ...]] = ("spot", "futures")
# Calls due longer ago than this (no worker ran) are moved up to it: delayed, not burst.
CATCH_UP_S: Final = 10.0
# At most this many calls per poll kind and market in one tick, so a tick stays short.
MOST_CLAIMS_PER_TICK: Final = 50
SUMMARY_EVERY_S: Final = 60.0
LIMITS_REFRESH_S: Final = 3600.0  # the exchange's announced weight limit is read again this often
LIMITS_RETRY_S: Final = 300.0


@dataclass
class TickSummary:
    """What one tick did, per `<kind>/<market>`."""

    sent: Counter[str] = field(default_factory=Counter)
    failed: dict[str, str] = field(default_factory=dict)  # "<kind>/<market>/<symbol>" -> reason
    deferred: list[str] = field(default_factory=list)  # "<kind>/<market>" whose weight was spent
    paused: list[str] = field(default_factory=list)  # markets under a 429/418 pause

    def as_dict(self) -> dict[str, object]:
        return {
            "sent": dict(self.sent),
            "failed": dict(self.failed),
            "deferred": list(self.deferred),
            "paused": list(self.paused),
        }


@dataclass(frozen=True)
class Call:
    """One claimed scheduled call: which table its body goes to, and the request."""

    table: str
    request: RestRequest


def symbols_by_market(settings: Settings, client: redis.Redis) -> dict[Market, list[str]]:
    """The symbols each market records right now (configured, or published for ALL)."""
    return {market: current_symbols(settings, client, market) for market in MARKETS}


def plans_for(
    settings: Settings, symbols: dict[Market, list[str]], limits: dict[Market, int | None] | None = None
) -> dict[Market, MarketPlan]:
    """The plan of every market that records symbols, within each market's announced limit."""
    limits = limits or {}
    return {
        market: plan_market(settings, market, len(listed), limits.get(market))
        for market, listed in symbols.items()
        if listed
    }


def weight_limits(
    settings: Settings, client: redis.Redis, symbols: dict[Market, list[str]], refresh: bool = True
) -> dict[Market, int | None]:
    """Each market's REQUEST_WEIGHT per minute as the exchange announces it, refreshed hourly.

    binance.md §4.5: USD-M documents no number, "read the rateLimits array from exchangeInfo"; the
    limit changed before (1,200 -> 2,400, shared with COIN-M since 2026-06-30). The tick that
    creates the market's refresh key fetches it; other ticks read what was published. Until then,
    or when the answer carries no believable limit, Binance's documented limit applies.
    """
    limits: dict[Market, int | None] = {}
    for market, listed in symbols.items():
        if (
            refresh
            and listed
            and client.set(keys.rest_limits_refresh(market), 1, nx=True, ex=int(LIMITS_REFRESH_S))
        ):
            _refresh_limit(settings, client, market, listed[0])
        limits[market] = announced_limit(client, market)
    return limits


def _refresh_limit(settings: Settings, client: redis.Redis, market: Market, probe_symbol: str) -> None:
    base = settings.binance_spot_rest_url if market == "spot" else settings.binance_futures_rest_url
    rest = RestClient(settings, client, _session(), max_wait_s=0, max_retries=0)
    try:
        body = rest.get(rate_limits_request(market, base, probe_symbol)).body
    except RestError as error:
        # Try again in a few minutes, not every second: exchangeInfo costs weight too.
        client.set(keys.rest_limits_refresh(market), 1, ex=int(LIMITS_RETRY_S))
        logger.warning("rest.limits_unknown market=%s error=%s (documented limit used)", market, error)
        return
    limit = request_weight_limit_1m(body)
    if limit is None:
        logger.warning(
            "rest.limits_missing market=%s (exchangeInfo has no REQUEST_WEIGHT per minute)", market
        )
        return
    if limit != announced_limit(client, market):
        logger.info("rest.limits market=%s request_weight_1m=%d (exchangeInfo rateLimits)", market, limit)
        announce_limit(client, market, limit)


def announce(plans: dict[Market, MarketPlan], client: redis.Redis, always: bool = False) -> None:
    """Store each market's plan for /metrics and status; log it when it changed, is new, or `always`."""
    stored = client.hgetall(keys.REST_PLAN)
    for market, plan in plans.items():
        record = plan.as_record(now_us())
        previous = stored.get(market.encode())
        if not always and previous is not None and _same_plan(orjson.loads(previous), record):
            continue
        client.hset(keys.REST_PLAN, market, orjson.dumps(record))
        (logger.warning if plan.stretch > 1 else logger.info)(plan.describe())
    for gone in {name.decode() if isinstance(name, bytes) else name for name in stored} - set(plans):
        client.hdel(keys.REST_PLAN, gone)


@dataclass(frozen=True)
class MarketRestState:
    """What an operator needs to see of one market's REST budget right now."""

    market: Market
    plan: dict[str, object] | None  # the announced plan (`MarketPlan.as_record`), None before any
    used_1m: int  # weight counted this minute
    paused_for_s: float  # left of a 429/418 pause


def rest_state(client: redis.Redis, now_s: float | None = None) -> list[MarketRestState]:
    """Every market's announced plan, this minute's weight and any pause, from Redis."""
    now_s = time.time() if now_s is None else now_s
    weight = RestWeight(client)
    plans = client.hgetall(keys.REST_PLAN)
    states = []
    for market in MARKETS:
        raw = plans.get(market.encode())
        states.append(
            MarketRestState(
                market,
                orjson.loads(raw) if raw is not None else None,
                used_weight(client, market, minute_of(now_s)),
                weight.paused_for_s(market),
            )
        )
    return states


def _same_plan(before: dict[str, object], after: dict[str, object]) -> bool:
    fields = ("needed_1m", "available_1m", "stretch", "symbols", "intervals_s")
    return all(before.get(name) == after.get(name) for name in fields)


def claim_due(
    settings: Settings,
    client: redis.Redis,
    symbols_of: dict[Market, list[str]],
    plans: dict[Market, MarketPlan],
    summary: TickSummary,
    now_s: float,
) -> list[Call]:
    """Claim every call that is due now, within the scheduled share of each market's minute."""
    weight = RestWeight(client)
    calls: list[Call] = []
    for market, plan in plans.items():
        symbols = symbols_of[market]
        for poll in plan.polls:
            claim = weight.claim(
                poll.kind,
                market,
                now_us_=int(now_s * 1e6),
                spacing_us=int(poll.spacing_s * 1e6),
                weight=poll.weight,
                limit=plan.scheduled_limit_1m,
                most=MOST_CLAIMS_PER_TICK,
                catch_up_us=int(CATCH_UP_S * 1e6),
                minute=minute_of(now_s),
            )
            if claim.state == "paused":
                if market not in summary.paused:
                    summary.paused.append(market)
                continue
            if claim.state == "weight_exhausted":
                summary.deferred.append(f"{poll.kind}/{market}")
            for number in range(claim.first, claim.first + claim.count):
                symbol = symbols[number % len(symbols)]
                calls.append(Call(poll.kind, _request(settings, poll, symbol)))
    return calls


def _request(settings: Settings, poll: PollPlan, symbol: str) -> RestRequest:
    if poll.kind == "open_interest":
        return open_interest_request(settings.binance_futures_rest_url, symbol)
    base = settings.binance_spot_rest_url if poll.market == "spot" else settings.binance_futures_rest_url
    return depth_request(poll.market, base, symbol, settings.depth_snapshot_limit)


# One pool and one HTTP session per thread, per worker process (created after the fork, on first
# use): connections to Binance are kept alive from one tick to the next.
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_local = threading.local()


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="rest-poll")
        return _pool


def _session() -> requests.Session:
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


def send(settings: Settings, client: redis.Redis, calls: list[Call], summary: TickSummary) -> None:
    """Send the claimed calls (their weight is already counted) and queue each answer."""

    def one(call: Call) -> tuple[Call, str]:
        # No waiting and one retry at most: a tick must stay short; a failed call comes round again.
        rest = RestClient(settings, client, _session(), max_wait_s=0, max_retries=1)
        try:
            response = rest.get(call.request, reserved=True)
        except RateLimited:
            return call, "rate_limited"
        except RestError as error:
            return call, str(error)
        except redis.RedisError as error:
            return call, f"redis: {error}"
        return call, queue_body(client, call.table, call.request.market, call.request.symbol or "", response)

    for call, reason in _executor(settings.rest_parallel_requests).map(one, calls):
        key = f"{call.table}/{call.request.market}"
        if reason:
            summary.failed[f"{key}/{call.request.symbol}"] = reason
        else:
            summary.sent[key] += 1


def run_tick(settings: Settings, client: redis.Redis, now_s: float | None = None) -> TickSummary:
    """One tick: plan, claim what is due, send it."""
    summary = TickSummary()
    symbols = symbols_by_market(settings, client)
    plans = plans_for(settings, symbols, weight_limits(settings, client, symbols))
    announce(plans, client)
    calls = claim_due(settings, client, symbols, plans, summary, time.time() if now_s is None else now_s)
    if calls:
        send(settings, client, calls, summary)
    _report(client, summary)
    return summary


def _report(client: redis.Redis, summary: TickSummary) -> None:
    """A WARNING for calls given up (one per tick); once a minute an INFO line with the totals of
    every worker process (`collector.queue.summary`); the tick itself at DEBUG."""
    if summary.failed:
        symbol, reason = next(iter(summary.failed.items()))
        logger.warning("rest.gave_up calls=%d e.g. %s: %s", len(summary.failed), symbol, reason)
    logger.debug("rest.tick %s", summary.as_dict())
    amounts = {f"sent {key}": count for key, count in summary.sent.items()}
    amounts |= {f"deferred {key}": 1 for key in summary.deferred}
    amounts["failed"] = len(summary.failed)
    taken = SharedSummary(client).add(keys.REST_SUMMARY, amounts, now_us(), SUMMARY_EVERY_S)
    if taken is None:
        return
    over_s, totals = taken
    if not any(totals.values()):
        return  # nothing polled, nothing failed: an idle minute is no news
    sent = " ".join(f"{k.split(' ', 1)[1]}={v}" for k, v in sorted(totals.items()) if k.startswith("sent "))
    deferred = " ".join(
        f"{k.split(' ', 1)[1]}={v}" for k, v in sorted(totals.items()) if k.startswith("deferred ")
    )
    logger.info(
        "rest.polls over_s=%.0f %s failed=%d deferred_ticks=[%s] (all worker processes)",
        over_s,
        sent or "sent=0",
        totals.get("failed", 0),
        deferred,
    )
