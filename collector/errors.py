"""The collector's error hierarchy. What is worth retrying is decided in one place: `collector.retry`.

- `CollectorError`: base of everything below.
  - `ConfigError`: bad settings; fatal at start, printed as one line per bad variable.
  - `ServiceUnavailable`: Redis or PostgreSQL cannot be reached; retryable.
  - `FrameError`: a frame or REST body that cannot be parsed; never retried, it goes to the dead-letter list.
  - `RestError`: a Binance REST call failed.
    - `RateLimited`: HTTP 429 or 418; carries the seconds Binance asked us to wait.
"""

from __future__ import annotations


class CollectorError(Exception):
    """Base class of the collector's own errors."""


class ConfigError(CollectorError):
    """Settings are missing or malformed. The message has one line per bad variable, naming it."""


class ServiceUnavailable(CollectorError):
    """Redis or PostgreSQL could not be reached. The message names the service and its address."""


def error_lines(error: CollectorError) -> str:
    """`error` as the command line prints it: each line of its message after `collector: `.

    A `ConfigError` may name several variables, one line each; the others are one line.
    """
    return "\n".join(f"collector: {line}" for line in str(error).splitlines() or [""])


class FrameError(CollectorError):
    """A received frame or body could not be parsed; the reason goes to the dead-letter list."""


class RestError(CollectorError):
    """A Binance REST request failed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RateLimited(RestError):
    """Binance answered 429 (slow down) or 418 (IP banned); wait `retry_after_s` before any request."""

    def __init__(self, message: str, status: int, retry_after_s: float) -> None:
        super().__init__(message, status)
        self.retry_after_s = retry_after_s
