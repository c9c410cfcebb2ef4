"""The REST weight budget: the plan's numbers, the shared claim and gate scripts on a real Redis over
simulated time, the fake exchange's 429-then-418 strictness, and a real worker + beat polling 500
futures and 1,500 spot symbols at default intervals without a single 429 or 418."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from collector.fake.server import FakeExchange
from collector.queue import keys
from collector.queue.rest_weight import RestWeight, used_weight
from collector.rest.budget import PLAN_FILL, gate_limit, minute_of, plan_market, seconds_to_next_minute
from collector.settings import Settings, load_settings
from tests.processes import Process, celery_beat, celery_worker, wait_until

# --- the plan, pure ------------------------------------------------------------------------------


def test_plan_at_default_settings() -> None:
    """500 futures and 1,500 spot symbols need more than the scheduled share: the intervals stretch by
    needed / available, and the announcement carries the numbers; 100 symbols fit as configured."""
    settings = load_settings()
    futures = plan_market(settings, "futures", 500)
    # open interest 500 x 1 per 60 s + depth 500 x 20 per 300 s = 500 + 2,000 a minute
    assert futures.needed_1m == pytest.approx(2500)
    # 2,400 less 10 % margin and 25 % for resyncs = 1,560; planned to fill 90 % of it
    assert futures.scheduled_limit_1m == 1560 and futures.resync_limit_1m == 2160
    assert futures.available_1m == pytest.approx(1560 * PLAN_FILL)
    assert futures.stretch == pytest.approx(2500 / 1404)
    oi, depth = futures.poll("open_interest"), futures.poll("depth_snapshots")
    assert oi is not None and depth is not None
    assert oi.interval_s == pytest.approx(60 * 2500 / 1404) and depth.interval_s == pytest.approx(
        300 * 2500 / 1404
    )
    assert "needed_1m=2500 available_1m=1404" in futures.describe()
    assert "open_interest=60s->107s depth_snapshots=300s->534s" in futures.describe()

    spot = plan_market(settings, "spot", 1500)
    assert spot.needed_1m == pytest.approx(1500 * 50 / 5) and spot.poll("open_interest") is None
    assert spot.stretch == pytest.approx(15000 / (3900 * PLAN_FILL))

    small = plan_market(settings, "futures", 100)
    assert small.stretch == 1 and "stretch=1 (the configured intervals fit)" in small.describe()
    # What the plan uses stays under the gate: the stretched intervals need exactly the available share.
    assert sum(p.symbols * p.weight * 60 / p.interval_s for p in futures.polls) == pytest.approx(1404)


def test_gate_limits_keep_the_resync_share() -> None:
    """Resyncs may go up to the margin; scheduled calls stop 25 % below it."""
    assert gate_limit("futures", 0.1, "resync") == 2160 and gate_limit("futures", 0.1, "scheduled") == 1560
    assert gate_limit("spot", 0.1, "resync") == 5400 and gate_limit("spot", 0.1, "scheduled") == 3900
    assert gate_limit("futures", 0.0, "scheduled") == 1800
    assert seconds_to_next_minute(1_764_000_015.5) == pytest.approx(44.5)  # Binance's clock minute


# --- the scripts, on a real Redis over simulated time --------------------------------------------


def test_claims_cover_every_symbol_once_per_interval_within_the_minute_budget(
    redis_conn: redis.Redis,
) -> None:
    """Ticks every second for a whole stretched cycle: each symbol is claimed once per (stretched)
    interval, calls are spread evenly, and no minute passes the scheduled limit."""
    settings = load_settings()
    plan = plan_market(settings, "futures", 500)
    weight = RestWeight(redis_conn)
    symbols = [f"S{i:03d}USDT" for i in range(500)]
    start_s = 1_800_000_000.0 + 17.3  # mid-minute, so the first minute is a partial one
    claimed: dict[str, list[tuple[float, str]]] = defaultdict(list)
    per_minute: Counter[int] = Counter()
    depth = plan.poll("depth_snapshots")
    assert depth is not None
    ticks = int(depth.interval_s) + 2
    for tick in range(ticks):
        now_s = start_s + tick
        for poll in plan.polls:
            claim = weight.claim(
                poll.kind,
                "futures",
                now_us_=int(now_s * 1e6),
                spacing_us=int(poll.spacing_s * 1e6),
                weight=poll.weight,
                limit=plan.scheduled_limit_1m,
                most=50,
                catch_up_us=10_000_000,
                minute=minute_of(now_s),
            )
            assert claim.state == "due", f"tick {tick}: {poll.kind} {claim}"
            per_minute[minute_of(now_s)] += claim.count * poll.weight
            for number in range(claim.first, claim.first + claim.count):
                claimed[poll.kind].append((now_s, symbols[number % len(symbols)]))
    for minute, spent in per_minute.items():
        assert spent == used_weight(redis_conn, "futures", minute) <= plan.scheduled_limit_1m
    for poll in plan.polls:
        calls = claimed[poll.kind]
        cycles = (ticks - 1) / poll.interval_s
        assert len(calls) == pytest.approx(500 * cycles, abs=2)
        # The first 500 calls are the 500 symbols, the last of them within the interval (plus the
        # tick's second of rounding: a call is claimed by the first tick after it is due).
        first_cycle = calls[:500]
        assert sorted(symbol for _, symbol in first_cycle) == symbols, poll.kind
        assert first_cycle[-1][0] <= start_s + poll.interval_s + 1
        # Evenly spread: no 10 s window holds more than its share (plus one tick's rounding).
        in_window = Counter(int((at - start_s) // 10) for at, _ in calls)
        assert max(in_window.values()) <= 10 / poll.spacing_s + 2


def test_claims_stop_at_the_limit_at_a_pause_and_catch_up_without_a_burst(redis_conn: redis.Redis) -> None:
    weight = RestWeight(redis_conn)
    now_s = 1_800_000_000.0
    args: dict[str, Any] = {
        "spacing_us": 100_000,
        "weight": 20,
        "limit": 100,
        "most": 50,
        "catch_up_us": 2_000_000,
        "minute": minute_of(now_s),
    }
    first = weight.claim("depth_snapshots", "futures", now_us_=int(now_s * 1e6), **args)
    assert (first.first, first.count, first.state) == (0, 1, "due")
    # 60 s later with nothing run: only the catch-up window's calls are due, and the limit stops them.
    later = weight.claim("depth_snapshots", "futures", now_us_=int((now_s + 60) * 1e6), **args)
    assert (later.first, later.count, later.state) == (1, 4, "weight_exhausted")
    assert used_weight(redis_conn, "futures", minute_of(now_s)) == 100
    next_minute = {**args, "minute": args["minute"] + 1}
    resumed = weight.claim("depth_snapshots", "futures", now_us_=int((now_s + 60) * 1e6), **next_minute)
    assert resumed.first == 5 and resumed.count == 5 and resumed.state == "weight_exhausted"
    weight.extend_pause("futures", int((now_s + 90) * 1e6))
    paused = weight.claim("depth_snapshots", "futures", now_us_=int((now_s + 61) * 1e6), **next_minute)
    assert (paused.count, paused.state) == (0, "paused")


def test_resyncs_keep_their_share_when_scheduled_calls_used_theirs(redis_conn: redis.Redis) -> None:
    weight = RestWeight(redis_conn)
    minute = 30_000_000
    scheduled, resync = gate_limit("futures", 0.1, "scheduled"), gate_limit("futures", 0.1, "resync")
    while weight.acquire("futures", 20, scheduled, minute)[0]:
        pass
    assert used_weight(redis_conn, "futures", minute) == 1560
    granted = 0
    while weight.acquire("futures", 20, resync, minute)[0]:
        granted += 1
    assert granted == 30 and used_weight(redis_conn, "futures", minute) == 2160
    # Binance's own count, when higher, becomes ours; never lower.
    assert weight.observe("futures", 2300, minute) == 2300 and weight.observe("futures", 10, minute) == 2300


# --- the fake exchange is as strict as Binance -----------------------------------------------------


def _get(url: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def test_fake_bans_an_ip_that_goes_on_after_a_429() -> None:
    """Past the minute's weight: 429 with Retry-After; sending again before it ends: a 418 ban of 2 min."""
    with FakeExchange(port=0, futures_symbols=["BTCUSDT"], spot_symbols=["BTCUSDT"]) as fake:
        if 60 - time.time() % 60 < 5:
            time.sleep(60 - time.time() % 60 + 0.1)  # not across a minute's edge
        url = f"{fake.futures_rest_url}/fapi/v1/depth?symbol=BTCUSDT&limit=1000"
        statuses = [_get(url)[0] for _ in range(121)]
        assert statuses == [200] * 120 + [429]  # 120 x 20 = 2,400
        status, headers = _get(url)
        assert status == 418 and 100 <= int(headers["Retry-After"]) <= 120
        assert _get(f"{fake.spot_rest_url}/api/v3/depth?symbol=BTCUSDT&limit=5")[0] == 200  # per market
        stats = _stats(fake)["futures"]
        assert stats["answered"] == {"200": 120, "418": 1, "429": 1} and stats["bans"] == 1


def _stats(fake: FakeExchange) -> dict[str, Any]:
    with urllib.request.urlopen(f"{fake.control_url}/rest_stats", timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


# --- a real worker and beat, 2,000 symbols, default intervals -----------------------------------------


def test_many_symbols_at_default_intervals_never_get_429(settings: Settings, tmp_path: Path) -> None:
    """500 futures and 1,500 spot symbols at default intervals: the worker announces the stretch, spreads
    the calls, and the fake's accounting shows zero 429/418 and no minute over the limit."""
    spot = [f"S{i:04d}USDT" for i in range(1500)]
    futures = [f"F{i:03d}USDT" for i in range(500)]
    with FakeExchange(port=0, spot_symbols=spot, futures_symbols=futures, rate=1) as fake:
        env = {
            "REDIS_URL": settings.redis_url,
            "DATABASE_URL": settings.database_url,
            "ALERT_LOG": str(settings.alert_log),
            "BINANCE_SPOT_REST_URL": fake.spot_rest_url,
            "BINANCE_FUTURES_REST_URL": fake.futures_rest_url,
            "BINANCE_SPOT_WS_URL": fake.spot_ws_url,
            "BINANCE_FUTURES_WS_URL": fake.futures_ws_url,
            "SPOT_SYMBOLS": ",".join(spot),
            "FUTURES_SYMBOLS": ",".join(futures),
        }
        client = redis.Redis.from_url(settings.redis_url)
        processes: list[Process] = [
            celery_worker(env, tmp_path, name="rest", queues="rest"),
            celery_beat(env, tmp_path),
        ]
        try:
            wait_until(lambda: client.llen(keys.queue("open_interest")) > 0, 60, "the first poll")
            started_s = time.time()
            wait_until(
                lambda: _ran_long_enough(fake, client, int(started_s // 60)),
                120,
                "a minute's edge passed, half an open-interest cycle polled, snapshots of both markets",
            )
            elapsed_s = time.time() - started_s
            stats = _stats(fake)
            plans = {m.decode(): orjson.loads(v) for m, v in client.hgetall(keys.REST_PLAN).items()}
            open_interest = _symbols_queued(client, "open_interest")
            snapshots = _symbols_queued(client, "depth_snapshots")
        finally:
            logs = "".join(process.log() for process in processes)
            for process in processes:
                process.stop()
            client.close()

    for market in ("spot", "futures"):
        answered = stats[market]["answered"]
        assert "429" not in answered and "418" not in answered, f"{market}: {answered}"
        assert max(stats[market]["weight_by_minute"].values()) <= stats[market]["limit_1m"]
    assert plans["futures"]["stretch"] == pytest.approx(2500 / 1404, rel=1e-3)
    assert plans["spot"]["intervals_s"]["depth_snapshots"] == pytest.approx(300 * 15000 / 3510, rel=1e-3)
    assert "rest.plan market=futures symbols=500 needed_1m=2500 available_1m=1404" in logs
    assert "stretched" in logs and "Traceback" not in logs

    # Spread evenly at the stretched pace: about elapsed / interval of the symbols, none twice.
    oi_interval = plans["futures"]["intervals_s"]["open_interest"]
    expected_oi = 500 * elapsed_s / oi_interval
    assert 0.8 * expected_oi <= len(open_interest) <= 1.1 * expected_oi + 60, (
        len(open_interest),
        expected_oi,
    )
    assert max(Counter(open_interest).values()) == 1
    spot_snapshots = [symbol for market, symbol in snapshots if market == "spot"]
    expected_spot = 1500 * elapsed_s / plans["spot"]["intervals_s"]["depth_snapshots"]
    assert 0.8 * expected_spot <= len(spot_snapshots) <= 1.1 * expected_spot + 60
    assert max(Counter(snapshots).values()) == 1


def _ran_long_enough(fake: FakeExchange, client: redis.Redis, first_minute: int) -> bool:
    """Polled into a later minute than the first (the limit is per minute), half of the 500 futures
    symbols' open interest asked (a full cycle is 107 s), and depth snapshots of both markets queued."""
    minutes = [int(m) for m in _stats(fake)["futures"]["weight_by_minute"]]
    snapshot_markets = {market for market, _ in _symbols_queued(client, "depth_snapshots")}
    return (
        max(minutes, default=first_minute) > first_minute
        and len(set(_symbols_queued(client, "open_interest"))) >= 250
        and snapshot_markets == {"spot", "futures"}
    )


def _symbols_queued(client: redis.Redis, table: str) -> list[Any]:
    """The symbols of the REST envelopes waiting in `table`'s queue (no drain runs in this test)."""
    found: list[Any] = []
    for raw in client.lrange(keys.queue(table), 0, -1):
        envelope = orjson.loads(raw)
        found.append(
            envelope["symbol"] if table == "open_interest" else (envelope["market"], envelope["symbol"])
        )
    return found


def test_status_shows_each_markets_plan_weight_and_pause(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """`collector status` names, per market, the weight used this minute, needed vs available (whole
    numbers), the stretch and intervals (one format: `5s`, `30s`, `1m46s`), and a running 429/418 pause."""
    from collector.rest.planner import announce

    spot_every_5s = settings.model_copy(update={"depth_snapshot_interval_s": 5})
    announce(
        {"futures": plan_market(settings, "futures", 500), "spot": plan_market(spot_every_5s, "spot", 2)},
        redis_conn,
    )
    RestWeight(redis_conn).acquire("futures", 120, 1560, minute_of(time.time()))
    RestWeight(redis_conn).extend_pause("futures", int((time.time() + 90) * 1e6))
    done = subprocess.run(
        [str(Path(sys.executable).with_name("collector")), "status"],
        env={"PATH": "/usr/bin:/bin", "REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    section = done.stdout.split("rest weight (per minute)\n", 1)[1].split("\n\n", 1)[0]
    futures = next(line for line in section.splitlines() if line.strip().startswith("futures"))
    assert futures.split()[:7] == ["futures", "500", "120", "2500", "1404", "2400", "x1.78"]
    assert "open_interest 1m46s" in futures and "(429/418)" in futures
    spot = next(line for line in section.splitlines() if line.strip().startswith("spot"))
    assert spot.split()[:7] == ["spot", "2", "0", "1200", "3510", "6000", "-"]
    assert spot.split()[7:] == ["depth_snapshots", "5s", "-"]


def test_ticks_send_what_is_due_and_nothing_while_paused(settings: Settings, redis_conn: redis.Redis) -> None:
    """In-process ticks against the fake: each symbol once per interval, queued for the drain; under a
    429 pause a tick sends nothing and returns at once (it never sleeps in a worker slot)."""
    from collector.rest.planner import run_tick

    with FakeExchange(
        port=0, spot_symbols=["BTCUSDT"], futures_symbols=["BTCUSDT", "ETHUSDT", "BNBUSDT"]
    ) as fake:
        local = settings.model_copy(
            update={
                "binance_spot_rest_url": fake.spot_rest_url,
                "binance_futures_rest_url": fake.futures_rest_url,
                "futures_symbols": ["BTCUSDT", "ETHUSDT", "BNBUSDT"],
                "spot_symbols": ["BTCUSDT"],
                "open_interest_interval_s": 3,
                "depth_snapshot_interval_s": 30,
            }
        )
        started = time.time()
        sent: Counter[str] = Counter()
        while time.time() - started < 5.9:
            sent.update(run_tick(local, redis_conn).sent)
            time.sleep(0.25)  # the beat's pace, sped up: what each tick finds due is what is counted
        assert sent["open_interest/futures"] in (6, 7)  # 3 symbols every 3 s, the first at once
        assert sent["depth_snapshots/futures"] == 1 and sent["depth_snapshots/spot"] == 1
        assert _symbols_queued(redis_conn, "open_interest").count("ETHUSDT") == 2

        RestWeight(redis_conn).extend_pause("futures", int((time.time() + 120) * 1e6))
        began = time.monotonic()
        paused = run_tick(local, redis_conn, now_s=time.time() + 10)
        assert time.monotonic() - began < 1 and paused.paused == ["futures"] and not paused.sent
        assert "429" not in _stats(fake)["futures"]["answered"]


def test_the_exchanges_announced_limit_replaces_the_documented_one(
    settings: Settings, redis_conn: redis.Redis
) -> None:
    """exchangeInfo's REQUEST_WEIGHT per minute is read (hourly) and the plan and gate follow it; an
    answer without a believable limit keeps Binance's documented one."""
    from collector.binance.exchange_info import request_weight_limit_1m
    from collector.queue.rest_weight import announced_limit
    from collector.rest.planner import plans_for, weight_limits

    limits = [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 1200}]
    assert request_weight_limit_1m(orjson.dumps({"rateLimits": limits})) == 1200
    assert request_weight_limit_1m(b'{"rateLimits":[{"rateLimitType":"ORDERS","interval":"MINUTE",'
                                   b'"intervalNum":1,"limit":1200}]}') is None  # fmt: skip
    assert request_weight_limit_1m(b'{"rateLimits":[{"rateLimitType":"REQUEST_WEIGHT","interval":"MINUTE",'
                                   b'"intervalNum":1,"limit":0}]}') is None  # fmt: skip
    assert request_weight_limit_1m(b"<html>") is None

    with FakeExchange(port=0, spot_symbols=["BTCUSDT"], futures_symbols=["BTCUSDT"]) as fake:
        local = settings.model_copy(
            update={
                "binance_spot_rest_url": fake.spot_rest_url,
                "binance_futures_rest_url": fake.futures_rest_url,
                "spot_symbols": ["BTCUSDT"],
                "futures_symbols": ["BTCUSDT"],
            }
        )
        symbols: dict[Any, list[str]] = {"spot": ["BTCUSDT"], "futures": ["BTCUSDT"]}
        assert weight_limits(local, redis_conn, symbols) == {"spot": 6000, "futures": 2400}
        answered = _stats(fake)
        # Fetched once: the next tick reads what was published.
        redis_conn.hset(keys.REST_LIMITS, "futures", 1200)
        assert weight_limits(local, redis_conn, symbols)["futures"] == 1200
        assert _stats(fake) == answered
    plan = plans_for(local, symbols, {"spot": None, "futures": 1200})["futures"]
    assert (plan.limit_1m, plan.scheduled_limit_1m) == (1200, 780)
    assert announced_limit(redis_conn, "futures") == 1200


def test_poll_tick_with_redis_down_logs_one_line_not_a_traceback_a_second(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import socket

    from collector.settings import get_settings
    from collector.tasks import rest as rest_tasks

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setattr(
        rest_tasks, "_redis_state", rest_tasks.Transitions(rest_tasks.logger, "rest.poll.redis")
    )
    get_settings.cache_clear()
    try:
        with caplog.at_level(logging.INFO):
            results = [rest_tasks.poll_due() for _ in range(3)]
    finally:
        get_settings.cache_clear()
    assert results == [None, None, None]
    lines = [r.getMessage() for r in caplog.records if "rest.poll.redis" in r.getMessage()]
    assert len(lines) == 1 and "unreachable" in lines[0] and f":{port}" in lines[0]


def test_the_minute_summary_adds_up_every_worker_process(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ticks run in whichever rest pool process takes them: the summary line sums all of them."""
    import logging

    from collector.rest import planner

    monkeypatch.setattr(planner, "SUMMARY_EVERY_S", 0.5)
    first, second = (redis.Redis.from_url(settings.redis_url) for _ in range(2))  # two processes
    one = planner.TickSummary(sent=Counter({"open_interest/futures": 3}), failed={"x/futures/A": "boom"})
    other = planner.TickSummary(sent=Counter({"open_interest/futures": 2, "depth_snapshots/spot": 1}))
    with caplog.at_level(logging.INFO, logger="collector.rest.planner"):
        planner._report(first, one)
        planner._report(second, other)
        assert not [r for r in caplog.records if "rest.polls" in r.getMessage()]
        time.sleep(0.6)  # past SUMMARY_EVERY_S on the summary's own clock: the interval is under test
        planner._report(first, planner.TickSummary())
    lines = [r.getMessage() for r in caplog.records if "rest.polls" in r.getMessage()]
    assert len(lines) == 1
    assert "depth_snapshots/spot=1 open_interest/futures=5 failed=1" in lines[0]
    assert lines[0].endswith("(all worker processes)")
