"""The two worker pools of the Procfile: REST work sitting out Binance's Retry-After never stalls a drain."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from collector.db.init import init_db
from collector.fake.server import FakeExchange
from collector.queue import keys
from collector.schedule import QUEUE_REST
from collector.settings import Settings
from collector.web.health import now_us
from tests.processes import (
    TIMEOUT_FACTOR,
    Process,
    celery_beat,
    celery_worker,
    collector_env,
    stream_process,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
RETRY_AFTER_S = 60  # the fake's 429 pause: longer than the window, so REST stays stuck throughout
WINDOW_S = 20
# Drains run every DRAIN_INTERVAL_S (1 s); a few missed beats would already show as a stale drain.
DRAIN_MAX_AGE_S = 5.0
# The fake's pace: agg_trades gets ~300 events/s, so a stalled drain piles up thousands in the window.
RATE = 200
BACKLOG_MAX = 5 * RATE


def _procfile_queues() -> dict[str, str]:
    """Process name -> `-Q` of each Celery worker in the Procfile, so the test runs the shipped split."""
    queues = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(celery .* worker .*)$", line)
        if match:
            argv = shlex.split(match.group(2))
            queues[match.group(1)] = argv[argv.index("-Q") + 1]
    return queues


def _trigger(what: list[str], env: dict[str, str]) -> None:
    collector = str(Path(sys.executable).with_name("collector"))
    done = subprocess.run(
        [collector, "trigger", *what], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def _drain_age_s(client: redis.Redis, table: str) -> float:
    last = client.hget(keys.DRAIN_LAST_SUCCESS_US, table)
    return float("inf") if last is None else (now_us() - int(last)) / 1e6


def _answered_429(client: redis.Redis) -> int:
    """REST answers with status 429 so far (the counter's fields are market|endpoint|status)."""
    counts: dict[bytes, bytes] = client.hgetall(keys.metric("rest_requests"))  # type: ignore[assignment]
    return sum(int(count) for field, count in counts.items() if field.endswith(b"|429"))


@pytest.fixture
def fake() -> Iterator[FakeExchange]:
    with FakeExchange(rate=RATE, seed=5) as exchange:
        yield exchange


def test_drains_keep_their_cadence_while_rest_sits_out_a_429(
    settings: Settings, fake: FakeExchange, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """With every REST process waiting out a 60 s Retry-After, agg_trades is still drained every second."""
    init_db(settings)
    pools = _procfile_queues()
    assert QUEUE_REST not in pools["worker-ingest"].split(",")
    fake.fail_rest(429, count=1000, retry_after_s=RETRY_AFTER_S)
    # A REST call sits out a pause up to this long, holding its worker process meanwhile.
    env = collector_env(settings, fake, REST_BACKOFF_MAX_S="600")
    processes: list[Process] = [
        stream_process(env, tmp_path),
        celery_worker(env, tmp_path, "worker-ingest", queues=pools["worker-ingest"]),
        celery_worker(env, tmp_path, "worker-rest", queues=pools["worker-rest"]),
        celery_beat(env, tmp_path),
    ]
    try:
        wait_until(lambda: _drain_age_s(redis_conn, "agg_trades") < 2, 60, "a first agg_trades drain")
        # Three REST tasks for two worker-rest processes: both sit out the pause, one waits its turn.
        for what in (["depth-snapshot", "--market", "spot"], ["depth-snapshot", "--market", "futures"]):
            _trigger(what, env)
        _trigger(["open-interest"], env)
        # Celery's Redis transport keeps each queue as a list of that name.
        wait_until(
            lambda: _answered_429(redis_conn) and redis_conn.llen(QUEUE_REST) > 0,
            30,
            "a 429 answered and REST work waiting for a worker-rest process",
        )

        ages: list[float] = []
        backlogs: list[int] = []
        inserted_before = int(redis_conn.hget(keys.metric("rows_inserted"), "agg_trades") or 0)
        deadline = time.monotonic() + WINDOW_S
        while time.monotonic() < deadline:
            ages.append(_drain_age_s(redis_conn, "agg_trades"))
            backlogs.append(redis_conn.llen(keys.queue("agg_trades")))
            time.sleep(0.5)  # a sample every 0.5 s over the whole window: the worst age is measured
        inserted = int(redis_conn.hget(keys.metric("rows_inserted"), "agg_trades") or 0) - inserted_before
        rest_waiting = redis_conn.llen(QUEUE_REST)
    finally:
        for process in processes:
            # worker-rest's warm shutdown would wait for the calls still sitting out the pause.
            process.stop(timeout_s=2 if process.name == "worker-rest" else 30)

    logs = " ".join(str(process.log_path) for process in processes)
    assert rest_waiting > 0, f"REST work was not held up, so this proves nothing (logs: {logs})"
    assert max(ages) <= DRAIN_MAX_AGE_S * TIMEOUT_FACTOR, f"drain stalled: ages {ages} (logs: {logs})"
    assert max(backlogs) <= BACKLOG_MAX * TIMEOUT_FACTOR, f"backlog grew: {backlogs} (logs: {logs})"
    assert inserted > WINDOW_S * RATE / 10, f"only {inserted} agg_trades rows in {WINDOW_S} s"
