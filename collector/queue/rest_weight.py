"""The REST weight contract in Redis: one per-minute weight counter per market, shared by every worker
and by the stream process's resyncs, plus the 429/418 pause. Its Lua scripts live here, once.

The counter mirrors Binance's own accounting (binance.md §4.5: per IP, per UTC clock minute): a
request may be sent only after its weight was added to the minute's counter without passing the
caller's limit (`collector.rest.budget.gate_limit`). After each answer the counter is raised to
Binance's `X-MBX-USED-WEIGHT-1M` when that is higher (other users of the IP, or requests we did not
count), never lowered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import redis

from collector.queue import keys

# A minute's counter outlives its minute a little, so a late reader still finds it.
WEIGHT_KEY_TTL_S: Final = 120

# KEYS[1] = weight counter of the minute; ARGV[1] = weight, ARGV[2] = limit, ARGV[3] = ttl (s).
# Returns {1, used} when the weight was added, {0, used} when it would pass the limit.
ACQUIRE_SCRIPT: Final = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local weight = tonumber(ARGV[1])
if used + weight > tonumber(ARGV[2]) then
  return {0, used}
end
used = redis.call('INCRBY', KEYS[1], weight)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, used}
"""

# KEYS[1] = weight counter of the minute; ARGV[1] = Binance's used weight, ARGV[2] = ttl (s).
OBSERVE_SCRIPT: Final = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > used then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return tonumber(ARGV[1])
end
return used
"""

# Claims the scheduled polls that are due, and their weight, in one step, so two workers never
# claim the same poll and never both spend the last of the minute's weight.
# KEYS[1] = poll cursor (hash: next_due_us, counter), KEYS[2] = weight counter of the minute,
# KEYS[3] = the market's pause-until key.
# ARGV: now_us, spacing_us, weight per call, limit, most claims, catch-up (µs), weight ttl (s).
# Returns {first counter, claims, state}: state 0 = all due claimed, 1 = weight exhausted, 2 = paused.
# A cursor further behind than the catch-up window (no worker ran) moves up to it: the polls are
# delayed, none skipped, and the backlog never turns into a burst.
CLAIM_POLLS_SCRIPT: Final = """
local now = tonumber(ARGV[1])
local pause = tonumber(redis.call('GET', KEYS[3]) or '0')
local counter = tonumber(redis.call('HGET', KEYS[1], 'counter') or '0')
if pause > now then
  return {counter, 0, 2}
end
local next_due = tonumber(redis.call('HGET', KEYS[1], 'next_due_us') or ARGV[1])
local spacing = tonumber(ARGV[2])
local weight = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local most = tonumber(ARGV[5])
local oldest = now - tonumber(ARGV[6])
if next_due < oldest then
  next_due = oldest
end
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local claims = 0
local state = 0
while next_due <= now and claims < most do
  if used + weight > limit then
    state = 1
    break
  end
  claims = claims + 1
  used = used + weight
  next_due = next_due + spacing
end
if claims > 0 then
  redis.call('INCRBY', KEYS[2], claims * weight)
  redis.call('EXPIRE', KEYS[2], ARGV[7])
end
redis.call('HSET', KEYS[1], 'next_due_us', string.format('%.0f', next_due),
  'counter', string.format('%.0f', counter + claims))
return {counter, claims, state}
"""

# KEYS[1] = pause key of the market; ARGV[1] = pause-until time (µs), ARGV[2] = expiry (ms).
# Only ever lengthens a pause: a short 429 Retry-After must not cut a running 418 ban short.
EXTEND_PAUSE_SCRIPT: Final = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

CLAIM_STATES: Final = ("due", "weight_exhausted", "paused")


@dataclass(frozen=True)
class Claim:
    """Scheduled polls claimed by one tick: poll numbers `first` .. `first + count - 1`."""

    first: int
    count: int
    state: str  # one of CLAIM_STATES


def now_us() -> int:
    return time.time_ns() // 1000


class RestWeight:
    """The scripts above, registered once on a client."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._observe = client.register_script(OBSERVE_SCRIPT)
        self._claim = client.register_script(CLAIM_POLLS_SCRIPT)
        self._extend_pause = client.register_script(EXTEND_PAUSE_SCRIPT)

    def acquire(self, market: str, weight: int, limit: int, minute: int) -> tuple[bool, int]:
        """Add `weight` to `market`'s minute unless that passes `limit`: (added, weight used)."""
        added, used = self._acquire(
            keys=[keys.rest_weight(market, minute)], args=[weight, limit, WEIGHT_KEY_TTL_S]
        )
        return bool(added), int(used)

    def observe(self, market: str, used: int, minute: int) -> int:
        """Raise the minute's counter to Binance's `X-MBX-USED-WEIGHT-1M`; returns the counter."""
        return int(self._observe(keys=[keys.rest_weight(market, minute)], args=[used, WEIGHT_KEY_TTL_S]))

    def claim(
        self,
        kind: str,
        market: str,
        *,
        now_us_: int,
        spacing_us: int,
        weight: int,
        limit: int,
        most: int,
        catch_up_us: int,
        minute: int,
    ) -> Claim:
        """Claim the `kind` polls of `market` due by `now_us_`, within `limit` and at most `most`."""
        first, count, state = self._claim(
            keys=[
                keys.rest_cursor(kind, market),
                keys.rest_weight(market, minute),
                keys.rest_pause_until(market),
            ],
            args=[now_us_, max(1, spacing_us), weight, limit, most, catch_up_us, WEIGHT_KEY_TTL_S],
        )
        return Claim(int(first), int(count), CLAIM_STATES[int(state)])

    def extend_pause(self, market: str, until_us: int) -> None:
        """No request to `market` before `until_us` (only ever lengthens a running pause)."""
        expiry_ms = max(1, (until_us - now_us()) // 1000 + 1)
        self._extend_pause(keys=[keys.rest_pause_until(market)], args=[until_us, expiry_ms])

    def paused_for_s(self, market: str) -> float:
        """Seconds left of `market`'s 429/418 pause (0 when none)."""
        raw = self._client.get(keys.rest_pause_until(market))
        if raw is None:
            return 0.0
        return max(0.0, (int(raw) - now_us()) / 1e6)


def announced_limit(client: redis.Redis, market: str) -> int | None:
    """The REQUEST_WEIGHT per minute the exchange announced for `market` (None: not fetched yet)."""
    raw = client.hget(keys.REST_LIMITS, market)
    return int(raw) if raw is not None else None


def announce_limit(client: redis.Redis, market: str, limit_1m: int) -> None:
    client.hset(keys.REST_LIMITS, market, limit_1m)


def used_weight(client: redis.Redis, market: str, minute: int) -> int:
    """The weight counted against `market` in `minute` (0 when nothing was sent)."""
    raw = client.get(keys.rest_weight(market, minute))
    return int(raw) if raw is not None else 0
