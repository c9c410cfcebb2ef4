"""Reconnect delays: exponential backoff with full jitter, as a pure generator (websockets' style)."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(
    initial_s: float, max_s: float, factor: float = 2.0, rng: random.Random | None = None
) -> Iterator[float]:
    """Yield seconds to wait before each successive retry, forever.

    Attempt n waits a uniform random time in [0, min(max_s, initial_s * factor**n)] ("full jitter",
    AWS Architecture Blog, "Exponential Backoff And Jitter"): many clients cut off at once (a Binance
    server restart, a Redis failover) spread their retries instead of arriving together. Pure: all
    randomness comes from `rng`, so a seeded `random.Random` makes the sequence reproducible.
    Start a new generator to reset the growth after a success.
    """
    if initial_s <= 0 or max_s <= 0:
        raise ValueError("backoff delays must be positive")
    if factor < 1:
        raise ValueError("backoff factor must be at least 1")
    draw = rng.random if rng is not None else random.random
    ceiling = min(initial_s, max_s)
    while True:
        yield draw() * ceiling
        ceiling = min(ceiling * factor, max_s)


class Reconnects:
    """Numbered reconnect attempts and their delays; `reset()` once a connection worked.

    Attempt 1 is the first reconnect after a connection that worked; the number and the delay grow
    together while attempts fail, so a log line's `attempt` says how far the backoff has gone.
    """

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._initial_s, self._max_s, self._rng = initial_s, max_s, rng
        self.reset()

    def reset(self) -> None:
        """Start again from attempt 1 and WS_BACKOFF_INITIAL_S."""
        self.attempt = 0
        self._delays = backoff_delays(self._initial_s, self._max_s, rng=self._rng)

    def next(self, immediate: bool = False) -> tuple[int, float]:
        """The next attempt's number and delay; `immediate` (a server's shutdown notice) waits 0 s
        and leaves the delays where they were."""
        self.attempt += 1
        return self.attempt, 0.0 if immediate else next(self._delays)
