"""Log summaries shared by every worker process: counts added up in one Redis hash per summary.

A task runs in whichever pool process takes it, so a summary kept in one process counts only that
process's share. Every run adds its counts to the summary's hash instead, and the run that finds the
summary due (or has something notable to report) takes the totals and starts the next summary in
the same script: each run is counted in exactly one summary, and two processes never report the
same interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import redis

# KEYS[1] = the summary hash
# ARGV[1] = now (µs), ARGV[2] = summary interval (µs), ARGV[3] = "1" to take the totals now,
# ARGV[4..] = field, amount pairs of this run
# Returns false while the summary is not due; else the totals as a flat field/value list, `since_us`
# (when the summary began) included, and the hash starts the next summary at ARGV[1].
ADD_RUN_SCRIPT: Final = """
local now = tonumber(ARGV[1])
local since = tonumber(redis.call('HGET', KEYS[1], 'since_us'))
if not since then
  since = now
  redis.call('HSET', KEYS[1], 'since_us', ARGV[1])
end
for i = 4, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[3] ~= '1' and now - since < tonumber(ARGV[2]) then
  return false
end
local totals = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'since_us', ARGV[1])
return totals
"""


class SharedSummary:
    """Adds runs to a shared summary, and hands out the totals when one is due."""

    def __init__(self, client: redis.Redis) -> None:
        self._add_run = client.register_script(ADD_RUN_SCRIPT)

    def add(
        self, key: str, amounts: Mapping[str, int], now_us: int, interval_s: float, take_now: bool = False
    ) -> tuple[float, dict[str, int]] | None:
        """Add `amounts` to the summary in `key`.

        Returns (seconds covered, totals by field), this run included, when `interval_s` has passed
        since the summary began or `take_now`; then the next summary begins at `now_us`. Else None.
        """
        args: list[int | str] = [now_us, int(interval_s * 1_000_000), "1" if take_now else "0"]
        for name, amount in amounts.items():
            args += [name, int(amount)]
        flat = self._add_run(keys=[key], args=args)
        if not flat:
            return None
        totals = {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        return (now_us - totals.pop("since_us")) / 1_000_000, totals


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
