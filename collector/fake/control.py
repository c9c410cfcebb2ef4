"""The fake exchange's control surface (`/_fake/...`): ledger, faults, pacing, liquidation injection,
listings and delistings.

`Controls` holds the operations; the HTTP endpoints and `FakeExchange`'s methods both call it on the
server's event loop, so tests in-process and scripts over HTTP see the same behaviour.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

from aiohttp import web

from collector.fake.faults import market_of
from collector.fake.generators import Market
from collector.fake.hub import Hub, Session
from collector.fake.rest import ERROR_BODIES, RestApi

logger = logging.getLogger(__name__)

SIDES = ("BUY", "SELL")
MARKETS: tuple[Market, ...] = ("spot", "futures")


class ControlError(ValueError):
    """A control request with a bad parameter."""


class Controls:
    """Operations on a running fake exchange; call them on its event loop."""

    def __init__(self, hub: Hub, rest: RestApi) -> None:
        self.hub = hub
        self.rest = rest

    def ledger(self) -> dict[str, Any]:
        return self.hub.ledger.as_json()

    def connections(self) -> list[dict[str, Any]]:
        return [session.describe() for session in self.hub.sessions.values()]

    def drop(self) -> int:
        """Abort every WebSocket connection with no close frame; returns how many."""
        sessions = list(self.hub.sessions.values())
        for session in sessions:
            session.abort()
        logger.info("fake.drop connections=%d", len(sessions))
        return len(sessions)

    def malformed(self, count: int) -> None:
        if count < 0:
            raise ControlError("count must be >= 0")
        self.hub.malformed_pending += count

    def rest_fail(self, status: int, count: int, retry_after_s: float) -> None:
        if status not in ERROR_BODIES:
            raise ControlError(f"status must be one of {sorted(ERROR_BODIES)}")
        if count < 0 or retry_after_s < 0:
            raise ControlError("count and retry_after must be >= 0")
        self.rest.faults.status = status
        self.rest.faults.count = count
        self.rest.faults.retry_after_s = retry_after_s

    def liquidation(self, symbol: str, side: str, price: str, quantity: str) -> dict[str, Any]:
        """Push one USD-M liquidation now; it bypasses pause, pacing and max_events."""
        side = side.upper()
        if not symbol or side not in SIDES or not price or not quantity:
            raise ControlError("need symbol, side BUY|SELL, price and quantity")
        event = self.hub.inject_liquidation(symbol.upper(), side, str(price), str(quantity))
        self.hub.wake_all()
        parsed: dict[str, Any] = json.loads(event.data)
        return parsed

    def withhold_depth(self, market: str, symbol: str, count: int) -> None:
        """Produce the next `count` diff-depth events of a symbol but send them on no connection.

        The book and its update ids advance as usual; each withheld event's identity is listed in the
        ledger's `withheld` section. Other symbols are untouched; repeated calls add up.
        """
        checked = _market(market)
        symbol = symbol.upper()
        universe = self.hub.spot_symbols if checked == "spot" else self.hub.futures_symbols
        if symbol not in universe:
            raise ControlError(f"{symbol!r} is not a {checked} symbol of this fake")
        if count < 0:
            raise ControlError("count must be >= 0")
        self.hub.withhold_depth(checked, symbol, count)
        logger.info("fake.withhold_depth market=%s symbol=%s count=%d", checked, symbol, count)

    def list_symbol(self, market: str, symbol: str) -> bool:
        """List `symbol` now (TRADING in exchangeInfo, its streams send); False if it already was."""
        checked, symbol = _market(market), _symbol(symbol)
        listed = self.hub.list_symbol(checked, symbol)
        logger.info("fake.list market=%s symbol=%s changed=%s", checked, symbol, listed)
        return listed

    def delist_symbol(self, market: str, symbol: str) -> bool:
        """Delist `symbol` now (not TRADING in exchangeInfo, streams silent); False if it was not listed."""
        checked, symbol = _market(market), _symbol(symbol)
        delisted = self.hub.delist_symbol(checked, symbol)
        logger.info("fake.delist market=%s symbol=%s changed=%s", checked, symbol, delisted)
        return delisted

    def silence(self, seconds: float, market: str | None = None) -> list[int]:
        """Make every open connection (of `market`) send no data frames for `seconds`; returns their ids.

        Pings and replies continue; events produced meanwhile are lost to those connections and listed
        in the ledger's `silences` section. Connections opened later are not silent.
        """
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ControlError("seconds must be > 0")
        sessions = self._matching(market)
        for session in sessions:
            session.silence(seconds)
        return [session.connection_id for session in sessions]

    def server_shutdown(self, notice_s: float, market: str | None = None) -> dict[str, list[int]]:
        """Send the serverShutdown notice on every open connection (of `market`), close them after `notice_s`.

        Only spot connections get a notice (binance.md §2, §8); USD-M ones are closed at the same
        moment without one. Data flows normally until the close (1001). Returns the ids of the
        connections to be closed (`connections`) and of those notified (`notified`).
        """
        if not (notice_s >= 0 and math.isfinite(notice_s)):
            raise ControlError("notice_s must be >= 0")
        sessions = self._matching(market)
        notified = [session.connection_id for session in sessions if session.shut_down(notice_s)]
        return {"connections": [session.connection_id for session in sessions], "notified": notified}

    def _matching(self, market: str | None) -> list[Session]:
        sessions = list(self.hub.sessions.values())
        if market is None:
            return sessions
        checked = _market(market)
        return [session for session in sessions if market_of(session.family) == checked]

    def pause(self) -> None:
        self.hub.paused = True

    def resume(self) -> None:
        self.hub.paused = False
        self.hub.wake_all()

    def set_rate(self, rate: float, total: bool | None = None) -> None:
        """Data events/s per connection, or of all connections together with `total` (None: as before)."""
        if rate < 0:
            raise ControlError("rate must be >= 0")
        self.hub.rate = rate
        if total is not None:
            self.hub.rate_is_total = total
        self.hub.wake_all()

    def counts(self) -> dict[str, Any]:
        """Frames written so far, without the ledger's keys: cheap to poll during a long benchmark."""
        ledger = self.hub.ledger
        return {
            "data_frames_sent": ledger.data_frames_sent,
            "malformed_sent": ledger.malformed_sent,
            "rate": self.hub.rate,
            "rate_is_total": self.hub.rate_is_total,
            "connections": [counts.as_json() for counts in ledger.connections.values()],
        }

    # -- HTTP ------------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_fake/ledger", self._get_ledger),
            web.get("/_fake/connections", self._get_connections),
            web.get("/_fake/counts", self._get_counts),
            web.post("/_fake/drop", self._post_drop),
            web.post("/_fake/malformed", self._post_malformed),
            web.post("/_fake/rest_fail", self._post_rest_fail),
            web.get("/_fake/rest_stats", self._get_rest_stats),
            web.post("/_fake/liquidation", self._post_liquidation),
            web.post("/_fake/pause", self._post_pause),
            web.post("/_fake/resume", self._post_resume),
            web.post("/_fake/rate", self._post_rate),
            web.post("/_fake/withhold_depth", self._post_withhold_depth),
            web.post("/_fake/silence", self._post_silence),
            web.post("/_fake/server_shutdown", self._post_server_shutdown),
            web.post("/_fake/list", self._post_list),
            web.post("/_fake/delist", self._post_delist),
        ]

    async def _get_ledger(self, request: web.Request) -> web.Response:
        return web.json_response(self.ledger())

    async def _get_counts(self, request: web.Request) -> web.Response:
        return web.json_response(self.counts())

    async def _get_rest_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.rest.stats())

    async def _get_connections(self, request: web.Request) -> web.Response:
        return web.json_response({"connections": self.connections()})

    async def _post_drop(self, request: web.Request) -> web.Response:
        return web.json_response({"dropped": self.drop()})

    async def _post_malformed(self, request: web.Request) -> web.Response:
        return _run(lambda: self.malformed(_number(request, "count", int, 1)))

    async def _post_rest_fail(self, request: web.Request) -> web.Response:
        return _run(
            lambda: self.rest_fail(
                _number(request, "status", int, 429),
                _number(request, "count", int, 1),
                _number(request, "retry_after", float, 1.0),
            )
        )

    async def _post_liquidation(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        try:
            sent = self.liquidation(
                str(body.get("symbol", "")),
                str(body.get("side", "")),
                str(body.get("price", "")),
                str(body.get("quantity", "")),
            )
        except ControlError as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response({"ok": True, "event": sent})

    async def _post_pause(self, request: web.Request) -> web.Response:
        return _run(self.pause)

    async def _post_resume(self, request: web.Request) -> web.Response:
        return _run(self.resume)

    async def _post_rate(self, request: web.Request) -> web.Response:
        total = request.query.get("total")
        return _run(
            lambda: self.set_rate(
                _number(request, "value", float, None), None if total is None else total in ("1", "true")
            )
        )

    async def _post_withhold_depth(self, request: web.Request) -> web.Response:
        return _run(
            lambda: self.withhold_depth(
                request.query.get("market", ""),
                request.query.get("symbol", ""),
                _number(request, "count", int, 1),
            )
        )

    async def _post_silence(self, request: web.Request) -> web.Response:
        return _answer(
            lambda: {
                "connections": self.silence(
                    _number(request, "seconds", float, None), request.query.get("market")
                )
            }
        )

    async def _post_server_shutdown(self, request: web.Request) -> web.Response:
        return _answer(
            lambda: self.server_shutdown(
                _number(request, "notice_s", float, None), request.query.get("market")
            )
        )

    async def _post_list(self, request: web.Request) -> web.Response:
        query = request.query
        return _answer(
            lambda: {"changed": self.list_symbol(query.get("market", ""), query.get("symbol", ""))}
        )

    async def _post_delist(self, request: web.Request) -> web.Response:
        query = request.query
        return _answer(
            lambda: {"changed": self.delist_symbol(query.get("market", ""), query.get("symbol", ""))}
        )


def _symbol(symbol: str) -> str:
    symbol = symbol.strip().upper()
    if not symbol or not symbol.replace("_", "").isalnum() or not symbol.isascii():
        raise ControlError(f"bad symbol {symbol!r} (letters and digits, e.g. BTCUSDT)")
    return symbol


def _market(market: str) -> Market:
    for known in MARKETS:
        if market == known:
            return known
    raise ControlError(f"market must be one of {list(MARKETS)}")


def _number(request: web.Request, name: str, kind: type[int] | type[float], default: float | None) -> Any:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise ControlError(f"missing parameter {name}")
        return kind(default)
    try:
        return kind(raw)
    except ValueError as error:
        raise ControlError(f"bad parameter {name}={raw!r}") from error


def _run(action: Any) -> web.Response:
    try:
        action()
    except ControlError as error:
        return web.json_response({"error": str(error)}, status=400)
    return web.json_response({"ok": True})


def _answer(action: Callable[[], dict[str, Any]]) -> web.Response:
    """`{"ok": true, **result}`, or 400 with the error."""
    try:
        result = action()
    except ControlError as error:
        return web.json_response({"error": str(error)}, status=400)
    return web.json_response({"ok": True, **result})
