"""Binance REST, pure: request builders, request weights, and the retry-or-fatal verdict per answer.

Nothing here sends a request; `collector.rest.client` does, and asks `classify` what an answer means.
Limits and weights are from binance.md §4 (Binance's REST docs and SDK, researched 2026-11-24).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import orjson

Market = Literal["spot", "futures"]
Endpoint = Literal["depth", "open_interest", "exchange_info"]
Action = Literal["ok", "wait", "retry", "fatal"]
TransportError = Literal["timeout", "connection_error", "invalid_request"]

SPOT_DEPTH_PATH: Final = "/api/v3/depth"
FUTURES_DEPTH_PATH: Final = "/fapi/v1/depth"
OPEN_INTEREST_PATH: Final = "/fapi/v1/openInterest"

# GET /api/v3/depth weight by limit, since 2023-10-19 (binance.md §4.1): (highest limit, weight).
SPOT_DEPTH_WEIGHTS: Final = ((100, 5), (500, 25), (1000, 50), (5000, 250))
# GET /fapi/v1/depth weight by limit (binance.md §4.2, Binance SDK market_data_api.py).
FUTURES_DEPTH_WEIGHTS: Final = {5: 2, 10: 2, 20: 2, 50: 2, 100: 5, 500: 10, 1000: 20}
# GET /fapi/v1/openInterest: weight 1 (binance.md §4.3, SDK; also measured as 1).
OPEN_INTEREST_WEIGHT: Final = 1
# Budgets per IP per minute (binance.md §4.5): spot 6000; USD-M 2400, shared with COIN-M since 2026-06-30.
SPOT_WEIGHT_PER_MINUTE: Final = 6000
FUTURES_WEIGHT_PER_MINUTE: Final = 2400

# 429 = a rate limit was broken; 418 = the IP is banned for going on after a 429 (binance.md §4.5).
RATE_LIMIT_STATUSES: Final = frozenset({429, 418})
# Binance sends Retry-After with 429/418 on spot; on USD-M it is not documented, so when it is
# missing we wait this long rather than hammering an exchange that just told us to stop.
DEFAULT_RETRY_AFTER_S: Final = 60.0
USED_WEIGHT_HEADER: Final = "X-MBX-USED-WEIGHT-1M"


@dataclass(frozen=True)
class RestRequest:
    """One GET to Binance: where, with what, and what it costs against the market's weight budget."""

    market: Market
    endpoint: Endpoint
    url: str
    params: dict[str, str | int] = field(default_factory=dict)
    weight: int = 1

    @property
    def symbol(self) -> str | None:
        value = self.params.get("symbol")
        return None if value is None else str(value)


@dataclass(frozen=True)
class Verdict:
    """What an answer means: `ok`, `wait` (rate limited), `retry` (with backoff) or `fatal`."""

    action: Action
    reason: str  # the `rest_errors` counter label; "" when ok
    retry_after_s: float = 0.0
    detail: str = ""  # Binance's `code msg`, for the one log line of a fatal error


def _join(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


def spot_depth_weight(limit: int) -> int:
    """Weight of GET /api/v3/depth with `limit` (Binance caps the limit at 5000)."""
    for highest, weight in SPOT_DEPTH_WEIGHTS:
        if limit <= highest:
            return weight
    return SPOT_DEPTH_WEIGHTS[-1][1]


def futures_depth_weight(limit: int) -> int:
    """Weight of GET /fapi/v1/depth; `ValueError` for a limit Binance refuses with -4021."""
    try:
        return FUTURES_DEPTH_WEIGHTS[limit]
    except KeyError:
        valid = ", ".join(map(str, FUTURES_DEPTH_WEIGHTS))
        raise ValueError(f"{limit} is not a futures depth limit (one of {valid})") from None


def depth_request(market: Market, base_url: str, symbol: str, limit: int) -> RestRequest:
    """GET {spot}/api/v3/depth or {futures}/fapi/v1/depth for one symbol."""
    if market == "spot":
        return RestRequest(
            "spot",
            "depth",
            _join(base_url, SPOT_DEPTH_PATH),
            {"symbol": symbol, "limit": limit},
            spot_depth_weight(limit),
        )
    return RestRequest(
        "futures",
        "depth",
        _join(base_url, FUTURES_DEPTH_PATH),
        {"symbol": symbol, "limit": limit},
        futures_depth_weight(limit),
    )


def open_interest_request(base_url: str, symbol: str) -> RestRequest:
    """GET {futures}/fapi/v1/openInterest for one symbol (there is no all-symbols form)."""
    return RestRequest(
        "futures",
        "open_interest",
        _join(base_url, OPEN_INTEREST_PATH),
        {"symbol": symbol},
        OPEN_INTEREST_WEIGHT,
    )


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup on any mapping (HTTP header names are case-insensitive)."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def retry_after_s(status: int, headers: Mapping[str, str], default: float = DEFAULT_RETRY_AFTER_S) -> float:
    """Seconds to stop calling the market after a 429/418: `Retry-After`, else `default`; 0 otherwise."""
    if status not in RATE_LIMIT_STATUSES:
        return 0.0
    value = header(headers, "Retry-After")
    if value is None:
        return default
    try:
        seconds = float(value.strip())
    except ValueError:
        # The HTTP-date form is allowed by RFC 9110 but Binance sends seconds; fall back safely.
        return default
    if seconds != seconds or seconds < 0:  # NaN or negative
        return default
    return seconds


def used_weight(headers: Mapping[str, str]) -> int | None:
    """The market's weight used in the current minute, from `X-MBX-USED-WEIGHT-1M`."""
    value = header(headers, USED_WEIGHT_HEADER)
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def binance_error(body: bytes) -> str:
    """`code msg` from Binance's error body `{"code":-1121,"msg":"Invalid symbol."}`, or a short excerpt."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(parsed, dict) and "code" in parsed:
        return f"{parsed.get('code')} {parsed.get('msg', '')}".strip()
    return body[:200].decode("utf-8", "replace")


def classify(
    status: int | None,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    transport_error: TransportError | None = None,
    default_retry_after_s: float = DEFAULT_RETRY_AFTER_S,
) -> Verdict:
    """Decide what to do with one answer (`status`) or with no answer (`transport_error`).

    429/418 -> wait for Retry-After (every worker, see `collector.rest.client`); 5XX, timeouts and
    dropped connections -> retry with backoff (a 5XX means "status unknown" on Binance, binance.md §4.5);
    any other 4XX (-1121 invalid symbol, -4021 bad depth limit, 403 WAF, 451 restricted location)
    -> fatal: asking again cannot change the answer.
    """
    if status is None:
        if transport_error == "invalid_request":
            return Verdict("fatal", "invalid_request", detail="the request could not be sent")
        return Verdict("retry", transport_error or "connection_error")
    if 200 <= status < 300:
        return Verdict("ok", "")
    if status in RATE_LIMIT_STATUSES:
        reason = "ip_banned" if status == 418 else "rate_limited"
        wait = retry_after_s(status, headers or {}, default_retry_after_s)
        return Verdict("wait", reason, wait, binance_error(body))
    if status >= 500:
        return Verdict("retry", "server_error", detail=binance_error(body))
    return Verdict("fatal", "client_error" if status >= 400 else f"http_{status}", detail=binance_error(body))


def backoff_s(attempt: int, initial_s: float, max_s: float, jitter: float) -> float:
    """Delay before retry number `attempt` (0-based): exponential, capped, with "equal jitter".

    `jitter` in [0, 1) comes from the caller (`random.random()`), so this stays pure and testable;
    the delay lies in [half, full] of the capped exponential, so retries from many workers spread out
    without ever retrying immediately.
    """
    capped = min(max_s, initial_s * (2.0 ** min(attempt, 32)))
    return capped / 2 + capped / 2 * min(max(jitter, 0.0), 1.0)
