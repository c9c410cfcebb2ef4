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
