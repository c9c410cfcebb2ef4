"""A `requests.Session` wrapper: timeouts, retries with backoff, the shared weight budget, and the
429/418 pause shared through Redis.

Binance's limits are per IP (binance.md §4.5), so every worker and the stream process share one
weight counter per market and minute (`collector.queue.rest_weight`): no request leaves before its
weight fits under its priority's limit (`collector.rest.budget.gate_limit`). A 429/418 stores "no
request to this market before T" in Redis and every client checks that before each request.
What an answer means (retry, wait, fatal) is decided by the pure `collector.binance.rest.classify`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import requests

from collector.binance.rest import (
    RestRequest,
    Verdict,
    backoff_s,
    classify,
    used_weight,
)
from collector.errors import RateLimited, RestError
from collector.queue import counters
from collector.queue.rest_weight import RestWeight, announced_limit
from collector.rest.budget import Priority, gate_limit, minute_of, seconds_to_next_minute
from collector.retry import is_transient
from collector.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestResponse:
    """A successful answer: the body exactly as received, and when it arrived."""

    status: int
    body: bytes
    received_at_us: int
    used_weight: int | None


def now_us() -> int:
    return time.time_ns() // 1000


class RestClient:
    """GETs to Binance with `(connect, read)` timeouts, retries, and the shared rate-limit pause.

    `max_wait_s` is the longest wait a call sits out before sending, for a pause or for the next
    minute's weight; a longer one (a 418 ban lasts 2 minutes to 3 days) raises `RateLimited` at once
    so the worker is not held. `priority` chooses the weight limit (resyncs may use the resync share).
    Not thread-safe: one client per thread.
    """

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        session: requests.Session,
        max_wait_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
        priority: Priority = "scheduled",
        max_retries: int | None = None,
    ) -> None:
        self._settings = settings
        self._redis = client
        self._session = session
        self._max_wait_s = settings.rest_backoff_max_s if max_wait_s is None else max_wait_s
        self._sleep = sleep
        self._jitter = jitter
        self._priority: Priority = priority
        self._max_retries = settings.rest_max_retries if max_retries is None else max_retries
        self._weight = RestWeight(client)
        self._warned_minute = -1

    @property
    def timeout(self) -> tuple[float, float]:
        return (self._settings.rest_connect_timeout_s, self._settings.rest_read_timeout_s)

    def get(self, request: RestRequest, reserved: bool = False) -> RestResponse:
        """The answer to `request`; `RateLimited` or `RestError` after the retries are spent.

        `reserved`: the first attempt's weight was already counted (a claimed scheduled poll);
        every other attempt counts its own.
        """
        attempt = 0
        while True:
            self.wait_if_paused(request)
            if attempt > 0 or not reserved:
                self._acquire_weight(request)
            response, verdict = self._send(request)
            if verdict.action == "ok" and response is not None:
                received_at_us = now_us()
                used = used_weight(response.headers)
                return RestResponse(response.status_code, response.content, received_at_us, used)
            self._after_failure(request, None if response is None else response.status_code, verdict, attempt)
            attempt += 1

    def _after_failure(
        self, request: RestRequest, status: int | None, verdict: Verdict, attempt: int
    ) -> None:
        """Raise when the failure is final; otherwise set the pause or sleep the backoff."""
        self._record_error(request, verdict.reason)
        what = f"{request.market} {request.endpoint} {request.symbol}"
        last_try = attempt >= self._max_retries
        if verdict.action == "fatal":
            logger.error(
                "rest.fatal market=%s endpoint=%s symbol=%s status=%s reason=%s detail=%s",
                request.market,
                request.endpoint,
                request.symbol,
                status,
                verdict.reason,
                verdict.detail,
            )
            raise RestError(f"{what}: {verdict.detail or verdict.reason}", status)
        if verdict.action == "wait":
            status = status or 429
            self._pause(request, verdict, status)
            if last_try:
                raise RateLimited(f"{what}: rate limited ({status})", status, verdict.retry_after_s)
            return  # the next wait_if_paused sits the pause out (or raises if it is too long)
        if last_try:
            raise RestError(f"{what}: {verdict.reason} after {attempt + 1} attempts", status)
        delay = backoff_s(
            attempt, self._settings.rest_backoff_initial_s, self._settings.rest_backoff_max_s, self._jitter()
        )
        logger.warning(
            "rest.retry market=%s endpoint=%s symbol=%s reason=%s attempt=%d delay_s=%.3f",
            request.market,
            request.endpoint,
            request.symbol,
            verdict.reason,
            attempt + 1,
            delay,
        )
        self._sleep(delay)

    def paused_for_s(self, market: str) -> float:
        """Seconds left of the market's shared 429/418 pause (0 when none)."""
        return self._weight.paused_for_s(market)

    def _acquire_weight(self, request: RestRequest) -> None:
        """Count the request's weight against the market's minute, waiting for the next minute
        when this priority's share is spent (or raising `RateLimited` when that is too long)."""
        limit = gate_limit(
            request.market,
            self._settings.rest_weight_margin,
            self._priority,
            announced_limit(self._redis, request.market),
        )
        while True:
            now_s = time.time()
            added, used = self._weight.acquire(request.market, request.weight, limit, minute_of(now_s))
            if added:
                return
            # A little past the minute's edge, so our clock's minute has surely turned.
            wait_s = seconds_to_next_minute(now_s) + 0.05
            if wait_s > self._max_wait_s:
                raise RateLimited(
                    f"{request.market} REST weight of this minute spent ({used} of {limit} for "
                    f"{self._priority} calls); next minute in {wait_s:.0f} s",
                    429,
                    wait_s,
                )
            logger.info(
                "rest.weight_wait market=%s priority=%s used_1m=%d limit_1m=%d wait_s=%.1f",
                request.market,
                self._priority,
                used,
                limit,
                wait_s,
            )
            self._sleep(wait_s)

    def wait_if_paused(self, request: RestRequest) -> None:
        """Sit out the market's pause, or raise `RateLimited` when it is longer than `max_wait_s`."""
        remaining = self.paused_for_s(request.market)
        if remaining <= 0:
            return
        if remaining > self._max_wait_s:
            raise RateLimited(
                f"{request.market} REST paused for {remaining:.1f} s more (429/418 Retry-After)",
                429,
                remaining,
            )
        logger.info("rest.paused market=%s wait_s=%.3f", request.market, remaining)
        self._sleep(remaining)
        # Another worker may have extended the pause while we slept.
        while (remaining := self.paused_for_s(request.market)) > 0:
            if remaining > self._max_wait_s:
                raise RateLimited(f"{request.market} REST paused for {remaining:.1f} s more", 429, remaining)
            self._sleep(remaining)

    def _send(self, request: RestRequest) -> tuple[requests.Response | None, Verdict]:
        try:
            response = self._session.get(request.url, params=request.params, timeout=self.timeout)
        except requests.RequestException as error:
            # No answer: the house's one classification says whether asking again may help.
            self._record_request(request, "none")
            if isinstance(error, requests.Timeout):
                return None, classify(None, transport_error="timeout")
            if is_transient(error):
                return None, classify(None, transport_error="connection_error")
            # Malformed URL or similar: nothing to retry; the message says what is wrong.
            verdict = classify(None, transport_error="invalid_request")
            return None, Verdict(verdict.action, verdict.reason, detail=str(error))
        self._record_request(request, str(response.status_code))
        self._observe_weight(request, used_weight(response.headers))
        return response, classify(response.status_code, response.headers, response.content)

    def _observe_weight(self, request: RestRequest, used: int | None) -> None:
        """Binance's count of the minute, when it is higher than ours, becomes ours."""
        if used is None:
            return
        minute = minute_of(time.time())
        counted = self._weight.observe(request.market, used, minute)
        ours = gate_limit(
            request.market,
            self._settings.rest_weight_margin,
            "resync",
            announced_limit(self._redis, request.market),
        )
        if used > ours and self._warned_minute != minute:
            # More than we ever spend: something else uses this IP's weight.
            self._warned_minute = minute
            logger.warning(
                "rest.weight_high market=%s used_1m=%d our_limit_1m=%d counted_1m=%d "
                "(another client on this IP is using Binance's weight)",
                request.market,
                used,
                ours,
                counted,
            )

    def _pause(self, request: RestRequest, verdict: Verdict, status: int) -> None:
        self._weight.extend_pause(request.market, now_us() + int(verdict.retry_after_s * 1e6))
        logger.warning(
            "rest.rate_limited market=%s endpoint=%s status=%d retry_after_s=%g detail=%s",
            request.market,
            request.endpoint,
            status,
            verdict.retry_after_s,
            verdict.detail,
        )

    def _record_request(self, request: RestRequest, status: str) -> None:
        counters.incr(self._redis, "rest_requests", request.market, request.endpoint, status)

    def _record_error(self, request: RestRequest, reason: str) -> None:
        counters.incr(self._redis, "rest_errors", request.market, request.endpoint, reason)
