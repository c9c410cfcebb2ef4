"""Connection attempts per 5 minutes: when the next WebSocket handshake may go out. Pure (times passed in).

Binance allows 300 connection attempts per 5 minutes per IP on spot (binance.md §2); USD-M publishes
no figure (binance.md §8), so the same one is assumed there. Past it the IP is refused for a while,
which would cut every connection of this process at once. The process keeps to ATTEMPTS_PER_WINDOW,
a fifth below the limit: a second collector on the same IP during a deploy counts against it too.
"""

from __future__ import annotations

from collections import deque
from typing import Final

BINANCE_ATTEMPTS_PER_5_MIN: Final = 300  # binance.md §2 [S-WS]
ATTEMPTS_WINDOW_S: Final = 300.0
ATTEMPTS_PER_WINDOW: Final = 240


class AttemptWindow:
    """The start times of the last `limit` attempts; each new one is given the first free slot."""

    def __init__(self, limit: int = ATTEMPTS_PER_WINDOW, window_s: float = ATTEMPTS_WINDOW_S) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("an attempt window needs a positive limit and length")
        self.limit = limit
        self.window_s = window_s
        self._starts: deque[float] = deque()

    def reserve(self, now_s: float) -> float:
        """Seconds to wait before the attempt asked for at `now_s`; the slot is taken at once.

        Slots are handed out in order, so many connections asking together each wait their turn
        instead of all going at the first free moment.
        """
        starts = self._starts
        while starts and starts[0] <= now_s - self.window_s:
            starts.popleft()
        start = now_s if len(starts) < self.limit else starts[-self.limit] + self.window_s
        start = max(start, starts[-1] if starts else start)
        starts.append(start)
        return start - now_s


class ConnectionAttempts:
    """One attempt window per market: spot and USD-M are different hosts with their own counts."""

    def __init__(self, limit: int = ATTEMPTS_PER_WINDOW, window_s: float = ATTEMPTS_WINDOW_S) -> None:
        self._windows = {market: AttemptWindow(limit, window_s) for market in ("spot", "futures")}

    def reserve(self, market: str, now_s: float) -> float:
        """Seconds the next connection attempt to `market` must wait (0 almost always)."""
        return self._windows[market].reserve(now_s)
