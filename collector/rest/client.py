"""A `requests.Session` wrapper: timeouts, retries with backoff, and a 429/418 pause shared through Redis.

Binance's limits are per IP (binance.md §4.5), so every worker must stop when any one of them is
told to: a 429/418 stores "no request to this market before T" in Redis
(`collector.queue.keys.rest_pause_until`) and every client checks that key before each request.
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
    FUTURES_WEIGHT_PER_MINUTE,
    SPOT_WEIGHT_PER_MINUTE,
    RestRequest,
    Verdict,
    backoff_s,
    classify,
    used_weight,
)
from collector.errors import RateLimited, RestError
from collector.queue import counters, keys
from collector.settings import Settings

logger = logging.getLogger(__name__)

# Warn when a market's weight used this minute (X-MBX-USED-WEIGHT-1M) passes this share of its budget.
WEIGHT_WARN_FRACTION = 0.8

# KEYS[1] = pause key of the market; ARGV[1] = pause-until time (µs), ARGV[2] = expiry (ms).
# Only ever lengthens a pause: a short 429 Retry-After must not cut a running 418 ban short.
EXTEND_PAUSE_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


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

    `max_wait_s` is the longest pause a call sits out before sending; a longer one (a 418 ban lasts
    2 minutes to 3 days) raises `RateLimited` at once so the worker is not held. Not thread-safe.
    """

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        session: requests.Session,
        max_wait_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._redis = client
        self._session = session
        self._max_wait_s = settings.rest_backoff_max_s if max_wait_s is None else max_wait_s
        self._sleep = sleep
        self._jitter = jitter
        self._extend_pause = client.register_script(EXTEND_PAUSE_SCRIPT)

    @property
    def timeout(self) -> tuple[float, float]:
        return (self._settings.rest_connect_timeout_s, self._settings.rest_read_timeout_s)

    def get(self, request: RestRequest) -> RestResponse:
        """The answer to `request`; `RateLimited` or `RestError` after the retries are spent."""
        attempt = 0
        while True:
            self.wait_if_paused(request)
            response, verdict = self._send(request)
            if verdict.action == "ok" and response is not None:
                received_at_us = now_us()
                used = used_weight(response.headers)
                self._check_weight(request, used)
                return RestResponse(response.status_code, response.content, received_at_us, used)
            self._after_failure(request, None if response is None else response.status_code, verdict, attempt)
            attempt += 1

    def _after_failure(
        self, request: RestRequest, status: int | None, verdict: Verdict, attempt: int
    ) -> None:
        """Raise when the failure is final; otherwise set the pause or sleep the backoff."""
        self._record_error(request, verdict.reason)
        what = f"{request.market} {request.endpoint} {request.symbol}"
        last_try = attempt >= self._settings.rest_max_retries
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
        raw = self._redis.get(keys.rest_pause_until(market))
        if raw is None:
            return 0.0
        return max(0.0, (int(raw) - now_us()) / 1e6)

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
        except requests.Timeout:
            self._record_request(request, "none")
            return None, classify(None, transport_error="timeout")
        except (
            requests.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
        ):
            self._record_request(request, "none")
            return None, classify(None, transport_error="connection_error")
        except requests.RequestException as error:
            # Malformed URL or similar: nothing to retry; the message says what is wrong.
            self._record_request(request, "none")
            verdict = classify(None, transport_error="invalid_request")
            return None, Verdict(verdict.action, verdict.reason, detail=str(error))
        self._record_request(request, str(response.status_code))
        return response, classify(response.status_code, response.headers, response.content)

    def _pause(self, request: RestRequest, verdict: Verdict, status: int) -> None:
        until_us = now_us() + int(verdict.retry_after_s * 1e6)
        expiry_ms = max(1, int(verdict.retry_after_s * 1000) + 1)
        self._extend_pause(keys=[keys.rest_pause_until(request.market)], args=[until_us, expiry_ms])
        logger.warning(
            "rest.rate_limited market=%s endpoint=%s status=%d retry_after_s=%g detail=%s",
            request.market,
            request.endpoint,
            status,
            verdict.retry_after_s,
            verdict.detail,
        )

    def _check_weight(self, request: RestRequest, used: int | None) -> None:
        """Warn before Binance starts answering 429: the per-minute budget is shared by every worker."""
        budget = SPOT_WEIGHT_PER_MINUTE if request.market == "spot" else FUTURES_WEIGHT_PER_MINUTE
        if used is not None and used >= budget * WEIGHT_WARN_FRACTION:
            logger.warning("rest.weight_high market=%s used_1m=%d budget_1m=%d", request.market, used, budget)

    def _record_request(self, request: RestRequest, status: str) -> None:
        counters.incr(self._redis, "rest_requests", request.market, request.endpoint, status)

    def _record_error(self, request: RestRequest, reason: str) -> None:
        counters.incr(self._redis, "rest_errors", request.market, request.endpoint, reason)
