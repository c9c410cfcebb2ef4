"""The fake exchange's REST endpoints: depth snapshots, open interest, exchangeInfo, weights and faults.

Paths are Binance's below a market prefix (`/spot/api/v3/...`, `/futures/fapi/v1/...`). Every answer,
errors included, carries `X-MBX-USED-WEIGHT-1M`, counted per market over the UTC clock minute as
fstream's REST host does (binance.md §4.5); going past the minute's budget answers 429 like Binance.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from collector.fake.generators import DELISTED_SYMBOL, Market, symbol_rng, tick_decimals
from collector.fake.hub import Hub, now_ms

logger = logging.getLogger(__name__)

# Request weight per IP per minute: spot 6000, USD-M 2400 (binance.md §0 fact 8, §4.5).
WEIGHT_LIMIT_1M: dict[Market, int] = {"spot": 6000, "futures": 2400}
SPOT_DEPTH_MAX_LIMIT = 5000  # "If limit > 5000, only 5000 entries will be returned" (binance.md §4.1)
SPOT_DEPTH_DEFAULT_LIMIT = 100
FUTURES_DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)  # anything else is -4021 (binance.md §4.2)
FUTURES_DEPTH_DEFAULT_LIMIT = 500
SPOT_EXCHANGE_INFO_WEIGHT = 20  # binance.md §4.4
FUTURES_EXCHANGE_INFO_WEIGHT = 1
QUOTE_ASSETS = ("FDUSD", "USDT", "USDC", "BUSD", "BTC", "ETH", "EUR", "BNB", "TRY")

ERROR_BODIES: dict[int, dict[str, Any]] = {
    429: {"code": -1003, "msg": "Too many requests"},
    418: {"code": -1003, "msg": "Way too much request weight used; IP banned. Please use WebSocket Streams."},
    500: {"code": -1000, "msg": "An unknown error occurred while processing the request."},
}
INVALID_SYMBOL = {"code": -1121, "msg": "Invalid symbol."}
MISSING_SYMBOL = {
    "code": -1102,
    "msg": "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
}


class RestError(Exception):
    """An answer with Binance's error body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("msg"))
        self.status = status
        self.body = body


def spot_depth_weight(limit: int) -> int:
    """Spot `GET /api/v3/depth` weight by limit (binance.md §4.1)."""
    if limit <= 100:
        return 5
    if limit <= 500:
        return 25
    if limit <= 1000:
        return 50
    return 250


def futures_depth_weight(limit: int | None) -> int:
    """USD-M `GET /fapi/v1/depth` weight by limit; no limit measured as 1 (binance.md §4.2)."""
    if limit is None:
        return 1
    if limit <= 50:
        return 2
    return {100: 5, 500: 10}.get(limit, 20)


def split_symbol(symbol: str) -> tuple[str, str]:
    """(base, quote) of a symbol such as BTCUSDT or LRCBTC."""
    for quote in QUOTE_ASSETS:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], quote
    return symbol[:-4], symbol[-4:]


@dataclass
class WeightMeter:
    """Weight used per market in the current UTC minute."""

    minute: dict[Market, int] = field(default_factory=dict)
    used: dict[Market, int] = field(default_factory=dict)

    def current(self, market: Market, now_s: float) -> int:
        if self.minute.get(market) != int(now_s // 60):
            self.minute[market] = int(now_s // 60)
            self.used[market] = 0
        return self.used[market]

    def add(self, market: Market, weight: int, now_s: float) -> int:
        self.used[market] = self.current(market, now_s) + weight
        return self.used[market]


# An IP that sends again before a 429's Retry-After is over is banned (418): 2 minutes at first,
# doubling for repeat offenders up to 3 days (binance.md §4.5).
FIRST_BAN_S = 120.0
LONGEST_BAN_S = 3 * 86_400.0


@dataclass
class Penalties:
    """One market's rate-limit state, as Binance keeps it per IP: the 429 back-off and the ban."""

    back_off_until_s: float = 0.0  # Retry-After of the last 429
    banned_until_s: float = 0.0
    bans: int = 0

    def ban(self, now_s: float) -> float:
        """Ban the IP (418); returns the ban's length."""
        length = min(FIRST_BAN_S * 2.0**self.bans, LONGEST_BAN_S)
        self.bans += 1
        self.banned_until_s = now_s + length
        return length


@dataclass
class FaultPlan:
    """The next `count` REST requests answer `status` (with Retry-After for 418/429)."""

    status: int = 429
    count: int = 0
    retry_after_s: float = 1.0


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RestApi:
    """Binance's REST endpoints over the hub's books and symbol universe."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.meter = WeightMeter()
        self.faults = FaultPlan()
        self.penalties: dict[Market, Penalties] = {"spot": Penalties(), "futures": Penalties()}
        # What was answered, for the tests' accounting: per market, per status; weight per minute.
        self.answered: dict[Market, dict[int, int]] = {"spot": {}, "futures": {}}
        self.weight_by_minute: dict[Market, dict[int, int]] = {"spot": {}, "futures": {}}
        self._open_interest: dict[str, float] = {}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/spot/api/v3/depth", self._endpoint("spot", self._spot_depth)),
            web.get("/spot/api/v3/exchangeInfo", self._endpoint("spot", self._spot_exchange_info)),
            web.get("/spot/api/v3/ping", self._endpoint("spot", lambda q: (1, {}))),
            web.get("/spot/api/v3/time", self._endpoint("spot", lambda q: (1, {"serverTime": now_ms()}))),
            web.get("/futures/fapi/v1/depth", self._endpoint("futures", self._futures_depth)),
            web.get("/futures/fapi/v1/openInterest", self._endpoint("futures", self._open_interest_body)),
            web.get("/futures/fapi/v1/exchangeInfo", self._endpoint("futures", self._futures_exchange_info)),
            web.get("/futures/fapi/v1/ping", self._endpoint("futures", lambda q: (1, {}))),
            web.get(
                "/futures/fapi/v1/time", self._endpoint("futures", lambda q: (1, {"serverTime": now_ms()}))
            ),
        ]

    def _endpoint(
        self, market: Market, body: Callable[[dict[str, str]], tuple[int, dict[str, Any]]]
    ) -> Handler:
        """Wrap a `query -> (weight, body)` function with faults, weight accounting and errors."""

        async def handle(request: web.Request) -> web.StreamResponse:
            response = self._answer(market, request, body, time.time())
            self.answered[market][response.status] = self.answered[market].get(response.status, 0) + 1
            return response

        return handle

    def _answer(
        self,
        market: Market,
        request: web.Request,
        body: Callable[[dict[str, str]], tuple[int, dict[str, Any]]],
        now_s: float,
    ) -> web.Response:
        if self.faults.count > 0:  # scripted answers come first, whatever the state
            self.faults.count -= 1
            return self._fault(market, now_s)
        penalties = self.penalties[market]
        if now_s < penalties.banned_until_s:
            return self._rate_limited(market, 418, penalties.banned_until_s - now_s, now_s)
        if now_s < penalties.back_off_until_s:
            # Still sending while told to back off: that is what earns the ban.
            length = penalties.ban(now_s)
            logger.warning("fake.rest_ip_banned market=%s path=%s ban_s=%.0f", market, request.path, length)
            return self._rate_limited(market, 418, length, now_s)
        try:
            weight, payload = body(dict(request.query))
            status = 200
        except RestError as error:
            weight, status, payload = 1, error.status, error.body
        if self.meter.current(market, now_s) + weight > WEIGHT_LIMIT_1M[market]:
            logger.warning("fake.rest_weight_exceeded market=%s path=%s", market, request.path)
            retry_s = 60 - int(now_s) % 60
            penalties.back_off_until_s = now_s + retry_s
            return self._rate_limited(market, 429, retry_s, now_s)
        used = self.meter.add(market, weight, now_s)
        self._note_weight(market, used, now_s)
        return _json_response(payload, status, {"X-MBX-USED-WEIGHT-1M": str(used)})

    def _rate_limited(self, market: Market, status: int, retry_s: float, now_s: float) -> web.Response:
        headers = {
            "Retry-After": str(math.ceil(retry_s)),
            "X-MBX-USED-WEIGHT-1M": str(self.meter.current(market, now_s)),
        }
        return _json_response(ERROR_BODIES[status], status, headers)

    def _note_weight(self, market: Market, used: int, now_s: float) -> None:
        self.weight_by_minute[market][int(now_s // 60)] = used

    def stats(self) -> dict[str, Any]:
        """Per market: answers by status, weight used per UTC minute, the limit, the bans."""
        return {
            market: {
                "answered": {str(status): count for status, count in sorted(self.answered[market].items())},
                "weight_by_minute": {str(m): w for m, w in sorted(self.weight_by_minute[market].items())},
                "limit_1m": WEIGHT_LIMIT_1M[market],
                "bans": self.penalties[market].bans,
            }
            for market in ("spot", "futures")
        }

    def _fault(self, market: Market, now_s: float) -> web.Response:
        status = self.faults.status
        used = self.meter.add(market, 1, now_s)
        self._note_weight(market, used, now_s)
        headers = {"X-MBX-USED-WEIGHT-1M": str(used)}
        if status in (418, 429):
            headers["Retry-After"] = str(math.ceil(self.faults.retry_after_s))
        body = ERROR_BODIES.get(status, {"code": -1000, "msg": f"HTTP {status}"})
        logger.info("fake.rest_fault status=%d left=%d", status, self.faults.count)
        return _json_response(body, status, headers)

    # -- endpoint bodies (pure over the hub) -------------------------------------------------------

    def _symbol(self, market: Market, query: dict[str, str]) -> str:
        symbol = query.get("symbol", "")
        if not symbol:
            raise RestError(400, MISSING_SYMBOL)
        if market == "spot" and symbol != symbol.upper():
            legal = "Illegal characters found in parameter 'symbol'; legal range is '^[A-Z0-9-_.]{1,20}$'."
            raise RestError(400, {"code": -1100, "msg": legal})
        symbol = symbol.upper()  # fapi accepts lower case symbols (binance.md §4.4)
        universe = self.hub.spot_symbols if market == "spot" else self.hub.futures_symbols
        if symbol not in universe:
            raise RestError(400, INVALID_SYMBOL)
        return symbol

    def _spot_depth(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        symbol = self._symbol("spot", query)
        limit = _int_param(query, "limit")
        limit = SPOT_DEPTH_DEFAULT_LIMIT if limit is None else limit
        if limit < 1:
            raise RestError(400, {"code": -1100, "msg": "Illegal characters found in parameter 'limit'."})
        limit = min(limit, SPOT_DEPTH_MAX_LIMIT)
        last_update_id, bids, asks = self.hub.book("spot", symbol).snapshot(limit)
        return spot_depth_weight(limit), {"lastUpdateId": last_update_id, "bids": bids, "asks": asks}

    def _futures_depth(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        symbol = self._symbol("futures", query)
        limit = _int_param(query, "limit")
        if limit is not None and limit not in FUTURES_DEPTH_LIMITS:
            raise RestError(400, {"code": -4021, "msg": f"{limit} is not valid depth limit"})
        last_update_id, bids, asks = self.hub.book("futures", symbol).snapshot(
            limit or FUTURES_DEPTH_DEFAULT_LIMIT
        )
        now = now_ms()
        body = {"lastUpdateId": last_update_id, "E": now, "T": now - 3, "bids": bids, "asks": asks}
        return futures_depth_weight(limit), body

    def _open_interest_body(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        symbol = self._symbol("futures", query)
        rng = symbol_rng(self.hub.seed, "openInterest", symbol, str(now_ms() // 1000))
        value = self._open_interest.get(symbol)
        if value is None:
            value = 4e9 / self.hub.price("futures", symbol)  # open interest worth about 4 bn quote units
        value = max(value * (1.0 + rng.gauss(0.0, 0.002)), 1.0)
        self._open_interest[symbol] = value
        return 1, {"openInterest": f"{value:.3f}", "symbol": symbol, "time": now_ms()}

    def _spot_exchange_info(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        symbols = []
        # Delisted pairs stay in the list as BREAK; `symbolStatus` keeps one status only (binance.md §4.4).
        listed = [(symbol, "TRADING") for symbol in self.hub.spot_symbols]
        delisted = [(symbol, "BREAK") for symbol in self.hub.delisted["spot"]]
        wanted_status = query.get("symbolStatus")
        for symbol, status in listed + delisted:
            if wanted_status and status != wanted_status:
                continue
            base, quote = split_symbol(symbol)
            symbols.append(
                {
                    "symbol": symbol,
                    "status": status,
                    "baseAsset": base,
                    "baseAssetPrecision": 8,
                    "quoteAsset": quote,
                    "quotePrecision": 8,
                    "quoteAssetPrecision": 8,
                    "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
                    "isSpotTradingAllowed": True,
                    "isMarginTradingAllowed": False,
                    "permissions": [],
                    "permissionSets": [["SPOT"]],
                    "filters": self._filters("spot", symbol),
                }
            )
        limits = [
            {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
            {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
            {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 300000},
        ]
        body = {"timezone": "UTC", "serverTime": now_ms(), "rateLimits": limits, "exchangeFilters": []}
        return SPOT_EXCHANGE_INFO_WEIGHT, {**body, "symbols": symbols}

    def _futures_exchange_info(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        symbols = []
        settling = frozenset((*self.hub.delisted["futures"], DELISTED_SYMBOL))
        for symbol in (*self.hub.futures_symbols, *self.hub.delisted["futures"], DELISTED_SYMBOL):
            base, quote = split_symbol(symbol)
            symbols.append(
                {
                    "symbol": symbol,
                    "pair": symbol,
                    "contractType": "PERPETUAL",
                    "deliveryDate": 4133404800000,
                    "onboardDate": 1569398400000,
                    # A delisted contract stays listed, not TRADING (its mark price rows have T:0).
                    "status": "SETTLING" if symbol in settling else "TRADING",
                    "baseAsset": base,
                    "quoteAsset": quote,
                    "marginAsset": quote,
                    "pricePrecision": 8,
                    "quantityPrecision": 3,
                    "baseAssetPrecision": 8,
                    "quotePrecision": 8,
                    "underlyingType": "COIN",
                    "underlyingSubType": [],
                    "filters": self._filters("futures", symbol),
                    "orderTypes": [
                        "LIMIT",
                        "MARKET",
                        "STOP",
                        "STOP_MARKET",
                        "TAKE_PROFIT",
                        "TAKE_PROFIT_MARKET",
                    ],
                    "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
                }
            )
        limits = [
            {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 2400},
            {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 1200},
            {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 300},
        ]
        body = {"timezone": "UTC", "serverTime": now_ms(), "futuresType": "U_MARGINED", "rateLimits": limits}
        return FUTURES_EXCHANGE_INFO_WEIGHT, {**body, "exchangeFilters": [], "assets": [], "symbols": symbols}

    def _filters(self, market: Market, symbol: str) -> list[dict[str, str]]:
        decimals = tick_decimals(self.hub.price(market, symbol))
        tick = f"{10.0**-decimals:.{decimals}f}"
        return [
            {"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": "1000000", "tickSize": tick},
            {"filterType": "LOT_SIZE", "minQty": "0.001", "maxQty": "100000", "stepSize": "0.001"},
        ]


def _int_param(query: dict[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise RestError(400, {"code": -1100, "msg": f"Illegal characters found in parameter '{name}'."})
    return int(raw)


def _json_response(body: object, status: int, headers: dict[str, str]) -> web.Response:
    # Compact separators, as Binance sends.
    text = json.dumps(body, separators=(",", ":"))
    return web.Response(text=text, status=status, headers=headers, content_type="application/json")
