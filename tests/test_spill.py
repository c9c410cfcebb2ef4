"""The spill: its segment format, damage and restarts, and backpressure on the Redis queues."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg2
import pytest
import redis

from collector.db.init import init_db
from collector.fake.server import FakeExchange
from collector.local.servers import LocalService, free_port, start_postgres, start_redis
from collector.queue import keys
from collector.queue.envelope import make_envelope
from collector.queue.spill_stats import SpillFigures, drain_eta_s, read_figures
from collector.settings import Settings, load_settings
from collector.streams.pressure import QueueGauge, split
from collector.streams.spill import Groups, Spill
from collector.streams.spill_format import SegmentHeader, encode_header, encode_records, parse_records
from collector.web.health import assess, now_us, snapshot
from collector.web.metrics import families
from collector.web.status import render
from tests.processes import stream_process, wait_until
from tests.test_gaps_e2e import _drain_all
from tests.test_streams import STREAM_TABLES, InProcess, all_stored, queued, stream_settings, total_queued

KEY = "collector:queue:agg_trades"
COLLECTOR = str(Path(sys.executable).with_name("collector"))


def tagged(run: str, seq: int) -> bytes:
    """An aggTrade envelope numbered `seq` in `run`, as the stream process queues it."""
    frame = b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","s":"BTCUSDT","a":%d}}' % seq
    return make_envelope(
        "spot", 1_700_000_000_000_000 + seq, frame, audit=f',"run":"{run}","seq":{seq}'.encode()
    )


def write_segment(directory: Path, number: int, run: str, body: bytes) -> Path:
    """A segment as a stream process that died before sealing it leaves it: header and records only."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"seg-{number:012d}.spill"
    path.write_bytes(encode_header(SegmentHeader(run, 1_700_000_000_000_000)) + body)
    return path


def read_all(spill: Spill) -> list[bytes]:
    """Every envelope still on disk, oldest first, fed back and acknowledged chunk by chunk."""

    async def feed() -> list[bytes]:
        envelopes: list[bytes] = []
        while (chunk := await spill.read(64, 2)) is not None:
            envelopes += [record.envelope for record in chunk.records]
            spill.take(chunk)
            spill.ack(chunk)
        return envelopes

    return asyncio.run(feed())


# --- the format ----------------------------------------------------------------------------------


def test_records_read_back_as_written_and_a_cut_read_stops_before_the_cut_record() -> None:
    """Encoded records parse back to the same list, table and bytes; a read that cuts the last record
    stops at its start (not final) or reports its bytes as torn (final)."""
    envelopes = [b'{"a":1}', b'{"b":22}', b"x" * 1000]
    block = encode_records(KEY, "agg_trades", envelopes)
    whole = parse_records(block)
    assert [(r.key, r.table, r.envelope) for r in whole.records] == [
        (KEY, "agg_trades", e) for e in envelopes
    ]
    assert (whole.end, whole.skipped, whole.torn) == (len(block), [], 0)
    third = whole.records[2].offset
    cut = parse_records(block[:-10], final=False)
    assert [r.envelope for r in cut.records] == envelopes[:2] and cut.end == third and cut.torn == 0
    rest = parse_records(block[third:], base=third)
    assert [(r.envelope, r.offset) for r in rest.records] == [(envelopes[2], third)]
    torn = parse_records(block[:-10])
    assert len(torn.records) == 2 and torn.torn == len(block) - 10 - third


def test_a_torn_last_record_is_dropped_with_a_warning_naming_its_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A segment cut mid-record by a crash: the next start keeps every whole record, warns with the
    torn bytes, and counts the earlier run's numbers on disk as queued."""
    caplog.set_level(logging.INFO, logger="collector.streams")
    whole = encode_records(KEY, "agg_trades", [tagged("r1-1", n) for n in (1, 2, 3)])
    partial = encode_records(KEY, "agg_trades", [tagged("r1-1", 4)])[:17]
    path = write_segment(tmp_path / "spill", 1, "r1-1", whole + partial)
    spill = Spill(tmp_path / "spill", "r2-2")
    spill.open()
    try:
        assert f"spill.torn_tail path={path} bytes=17" in caplog.text
        assert spill.envelopes == 3 and dict(spill.held) == {KEY: 3}
        assert dict(spill.pending) == {"r1-1/agg_trades": 3}
        assert spill.recovered_seq == {"r1-1/agg_trades": 3}
        assert path.stat().st_size == len(encode_header(SegmentHeader("r1-1", 1_700_000_000_000_000))) + len(
            whole
        )
        assert read_all(spill) == [tagged("r1-1", n) for n in (1, 2, 3)]
        assert spill.envelopes == 0 and not list((tmp_path / "spill").glob("seg-*"))  # fed: deleted
    finally:
        spill.close()


def test_a_bad_checksum_is_skipped_with_a_clear_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record whose bytes changed on disk is skipped, named by offset and size; the others are read."""
    records = [encode_records(KEY, "agg_trades", [tagged("r1-1", n)]) for n in (1, 2, 3)]
    damaged = bytearray(records[1])
    damaged[-5] ^= 0xFF  # a byte of the envelope: the checksum no longer matches
    path = write_segment(tmp_path / "spill", 1, "r1-1", records[0] + bytes(damaged) + records[2])
    offset = path.stat().st_size - len(records[2]) - len(records[1])
    spill = Spill(tmp_path / "spill", "r2-2")
    spill.open()
    try:
        assert f"spill.damaged_record path={path} offset={offset} bytes={len(records[1])}" in caplog.text
        assert spill.envelopes == 2
        assert read_all(spill) == [tagged("r1-1", 1), tagged("r1-1", 3)]
    finally:
        spill.close()


def test_appends_feed_back_oldest_first_across_segments_and_resume_after_a_restart(tmp_path: Path) -> None:
    """Spilled envelopes come back in the order they went to disk, over several segments, also when
    a second process takes over half-way; fed segments are deleted."""
    first = Spill(tmp_path / "spill", "r1-1", segment_bytes=600)
    first.open()
    sent = [tagged("r1-1", n) for n in range(1, 21)]
    for start in range(0, 20, 4):
        asyncio.run(first.append(Groups([(KEY, "agg_trades", sent[start : start + 4])])))
    assert first.segments > 2 and first.envelopes == 20

    async def feed_some(spill: Spill, chunks: int) -> list[bytes]:
        got: list[bytes] = []
        for _ in range(chunks):
            chunk = await spill.read(300, 3)
            assert chunk is not None
            spill.take(chunk)
            spill.ack(chunk)
            got += [r.envelope for r in chunk.records]
        return got

    early = asyncio.run(feed_some(first, 3))
    first.close()
    second = Spill(tmp_path / "spill", "r2-2")
    second.open()
    try:
        assert second.envelopes == 20 - len(early)
        assert early + read_all(second) == sent
        assert not list((tmp_path / "spill").glob("seg-*"))
    finally:
        second.close()


def test_a_second_process_cannot_take_a_spill_directory_in_use(tmp_path: Path) -> None:
    """Two stream processes never share one SPILL_DIR: the second is refused with one line naming it."""
    from collector.errors import ConfigError

    first = Spill(tmp_path / "spill", "r1-1")
    first.open()
    try:
        with pytest.raises(ConfigError, match=r"SPILL_DIR: .* is in use by another stream process"):
            Spill(tmp_path / "spill", "r2-2").open()
    finally:
        first.close()


# --- routing and the gauge (pure) ----------------------------------------------------------------


def test_past_the_cap_the_rest_goes_to_disk_and_a_held_list_sends_nothing() -> None:
    """Each list fills the room left under the cap; one with envelopes on disk sends none to Redis."""
    sizes = {"a": 100.0, "b": 100.0, "c": 100.0}
    assert split({"a": 5, "b": 5}, {}, sizes, room_bytes=2000) == {"a": 5, "b": 5}
    assert split({"a": 5, "b": 5}, {}, sizes, room_bytes=700) == {"a": 5, "b": 2}
    assert split({"a": 5, "c": 5}, {"a": 1}, sizes, room_bytes=2000) == {"a": 0, "c": 5}
    assert split({"a": 5}, {}, sizes, room_bytes=-50) == {"a": 0}


def test_the_gauge_estimates_bytes_and_the_drains_pace() -> None:
    """Lengths times mean sizes; what left a list between two reads (pushes counted) is the drain pace."""
    gauge = QueueGauge()
    gauge.sample("a", [b"x" * 300, b"x" * 100])
    gauge.pushed("a", 10, 10)
    assert gauge.total_bytes() == 2000
    gauge.refreshed({"a": 10}, now=100.0)
    gauge.pushed("a", 5, 15)
    gauge.refreshed({"a": 5}, now=101.0)  # 10 + 5 pushed - 5 left = 10 drained in 1 s
    assert 0 < gauge.drain_rate <= 10
    assert drain_eta_s(100, 10.0) == 10.0 and drain_eta_s(0, 0.0) == 0.0 and drain_eta_s(5, 0.0) is None


# --- the stream process against the fake exchange, Redis and PostgreSQL ----------------------------

PUSHED = re.compile(
    r'"market":"(\w+)","received_at_us":\d+,"run":"([\w.-]+)","seq":(\d+),"frame":\{[^{]*\{[^}]*?"s":"(\w+)","a":(\d+)'
)


class QueueTap:
    """Every RPUSH onto one list, in the order Redis ran them (MONITOR): the order the list holds."""

    def __init__(self, url: str, key: str) -> None:
        self.key = key
        self.pushed: list[tuple[str, int, str, str, int]] = []  # run, seq, market, symbol, aggregate id
        self._client = redis.Redis.from_url(url)
        self._monitor = self._client.monitor().__enter__()  # MONITOR is on before this returns
        self._thread = threading.Thread(target=self._listen, name="queue-tap", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        prefix = f"RPUSH {self.key} "
        try:
            while True:
                command = self._monitor.next_command()["command"]
                if command.startswith(prefix):
                    self.pushed += [(r, int(q), m, s, int(a)) for m, r, q, s, a in PUSHED.findall(command)]
        except (redis.RedisError, OSError, AttributeError, TypeError):
            return  # close() cut the connection

    def close(self) -> None:
        self._monitor.connection.disconnect()
        self._thread.join(10)
        self._client.close()


def spill_figures(client: redis.Redis) -> SpillFigures | None:
    return read_figures(client)


def test_past_its_cap_the_queue_spills_survives_sigkill_and_is_stored_once_in_order(
    settings: Settings, tmp_path: Path
) -> None:
    """PostgreSQL down: the queue stops at REDIS_MAX_QUEUE_BYTES and the rest goes to disk; the stream
    process is SIGKILLed mid-spill (and its last write torn); restarted, it resumes the spill. Once
    PostgreSQL is back every event queued is stored exactly once, pushed in order per symbol, and
    `collector audit` balances. Status, /metrics and /health show the spill meanwhile."""
    cap = 30_000
    client = redis.Redis.from_url(settings.redis_url)
    server: LocalService = start_postgres(tmp_path / "pg", durable=False)
    own = load_settings(database_url=server.url, redis_url=settings.redis_url)
    init_db(own)
    server.stop()  # PostgreSQL down from here: nothing leaves the queue
    spill_dir = tmp_path / "spill"
    tap = QueueTap(settings.redis_url, keys.queue("agg_trades"))
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    second = None
    try:
        with FakeExchange(rate=100.0) as fake:
            env = {
                "REDIS_URL": settings.redis_url,
                "DATABASE_URL": server.url,
                "BINANCE_SPOT_WS_URL": fake.spot_ws_url,
                "BINANCE_FUTURES_WS_URL": fake.futures_ws_url,
                "SPOT_STREAMS": "aggTrade",
                "FUTURES_STREAMS": "aggTrade",
                "STREAM_FLUSH_INTERVAL_MS": "20",
                "REDIS_MAX_QUEUE_BYTES": str(cap),
                "SPILL_DIR": str(spill_dir),
            }
            first = stream_process(env, tmp_path / "first")
            try:
                wait_until(lambda: (f := spill_figures(client)) and f.envelopes >= 1000, 60, "1000 spilled")
                held = sum(map(len, client.lrange(keys.queue("agg_trades"), 0, -1)))
                assert cap * 0.7 <= held <= cap * 1.25, held  # Redis holds about the cap, no more
            finally:
                first.signal_group(signal.SIGKILL)
                first.popen.wait(30)
            segments = sorted(spill_dir.glob("seg-*.spill"))
            assert segments
            with segments[-1].open("ab") as file:  # a write the kill cut off
                file.write(encode_records(keys.queue("agg_trades"), "agg_trades", [b'{"cut":1}'])[:25])
            spilled_at_kill = spill_figures(client)
            assert spilled_at_kill is not None

            second = stream_process(env, tmp_path / "second")
            wait_until(lambda: "spill.resumed" in second.log(), 60, "the spill resumed")
            assert f"spill.torn_tail path={segments[-1]} bytes=25" in second.log()
            wait_until(
                lambda: (f := spill_figures(client)) and f.envelopes > spilled_at_kill.envelopes,
                60,
                "more spilled",
            )
            text, _ = render(own)
            assert "spilled; nothing drained lately" in text and "\n  spill: " in text, text
            snap = snapshot(own, client, log_changes=False)
            backlog = assess(snap, now_us(), own).body["backlog"]
            assert backlog["spilled"] > 0 and backlog["spill_bytes"] > 0 and backlog["spilling"]
            assert backlog["total"] == backlog["queued"] + backlog["in_flight"] + backlog["spilled"]
            exported = {m.name: m.samples[0].value for m in families(snap, now_us()) if m.samples}
            assert exported["collector_spill_envelopes"] == backlog["spilled"] > 0
            assert exported["collector_spill_bytes"] > 0 and exported["collector_backlog_envelopes"] > 0
            assert "collector_backlog_drain_eta_seconds" not in exported  # nothing drains: no estimate

            server = start_postgres(tmp_path / "pg", port=server.port, durable=False)  # PostgreSQL is back

            def all_fed() -> bool:
                _drain_all(own)
                figures = spill_figures(client)
                return bool(figures and figures.envelopes == 0 and not list(spill_dir.glob("seg-*.spill")))

            fake.pause()  # so the drains here outpace it on a loaded machine
            wait_until(all_fed, 120, "the spill fed back and drained")
            fake.resume()  # with nothing left on disk, new events go to Redis again
            more = len(tap.pushed) + 100
            wait_until(lambda: _drain_all(own) or len(tap.pushed) >= more, 60, "100 more events queued")
            fake.pause()
            wait_until(all_fed, 120, "the spill fed back and drained again")
            assert second.stop() == 0, second.log()
            assert not list(spill_dir.glob("seg-*.spill"))
        _drain_all(own)
        check_stored_once_in_order(own, tap.pushed)
    finally:
        if second is not None:
            second.stop()
        tap.close()
        server.stop()


def check_stored_once_in_order(settings: Settings, pushed: list[tuple[str, int, str, str, int]]) -> None:
    """What went onto the queue is stored once; each run pushed its numbers, and each symbol its
    trades, in order; `collector audit` balances with nothing pending."""
    runs = {run for run, *_ in pushed}
    assert len(runs) == 2, runs  # the killed run (its spill fed back) and the second one
    for run in runs:
        numbers = [seq for r, seq, *_ in pushed if r == run]
        assert numbers == sorted(set(numbers)), f"run {run} pushed out of order or twice"
        for market, symbol in {(m, s) for r, _, m, s, _ in pushed if r == run}:
            ids = [a for r, _, m, s, a in pushed if (r, m, s) == (run, market, symbol)]
            assert ids == sorted(set(ids)), (run, market, symbol)
    conn = psycopg2.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT market, symbol, aggregate_trade_id FROM agg_trades")
            stored = cur.fetchall()
    finally:
        conn.close()
    assert len(stored) == len(set(stored))  # exactly once
    assert set(stored) == {(m, s, a) for _, _, m, s, a in pushed}
    printed = subprocess.run(
        [COLLECTOR, "audit"],
        env={**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr
    trades = [line.split() for line in printed.stdout.splitlines() if line.startswith("agg_trades ")]
    assert len(trades) == 2, printed.stdout
    for row in trades:  # QUEUED, DRAINED, PENDING, LOST ... BALANCE
        assert row[2] == row[3] and row[4] == "0" and row[5] == "0" and row[-1] == "balanced", printed.stdout
    assert printed.stdout.strip().endswith("nothing lost")


@pytest.fixture
def fake() -> Iterator[FakeExchange]:
    with FakeExchange(rate=200.0) as exchange:
        yield exchange


def test_with_redis_down_memory_stays_bounded_and_a_stop_spills_the_rest(
    tmp_path: Path, fake: FakeExchange, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stopped: past STREAM_BUFFER_MAX_EVENTS the buffer goes to disk instead of growing, a stop
    spills what is left (nothing unflushed), and the next run feeds it all to Redis, in order."""
    caplog.set_level(logging.INFO, logger="collector.streams")
    monkeypatch.chdir(tmp_path)  # keep a developer's .env out of the settings
    workdir = tmp_path
    port = free_port()
    server: LocalService = start_redis(workdir / "redis", port=port, persistent=True)
    bound = 200
    overrides = {"stream_buffer_max_events": bound, "spill_dir": workdir / "spill"}
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        with InProcess(stream_settings(server.url, fake, **overrides)) as running:
            wait_until(lambda: total_queued(client) > 50, 30, "first events")
            server.stop()
            spill = running.sink.pressure.spill
            assert spill is not None
            wait_until(lambda: spill.envelopes >= 5 * bound, 60, "five buffers' worth on disk")
            assert "sink.spilled_buffer" in caplog.text
            assert running.stop() == 0  # everything received is on disk: nothing unflushed
        assert "sink.unflushed" not in caplog.text
        server = start_redis(workdir / "redis", port=port, persistent=True)
        with InProcess(stream_settings(server.url, fake, **overrides)):
            wait_until(lambda: "spill.resumed" in caplog.text, 30, "the spill resumed")
            fake.pause()
            wait_until(lambda: all_stored(client, fake), 60, "every event sent queued")
        for table in STREAM_TABLES:
            numbers: dict[str, list[int]] = {}
            for envelope in queued(client, table):
                parsed = orjson.loads(envelope)
                numbers.setdefault(parsed["run"], []).append(parsed["seq"])
            for run, seqs in numbers.items():  # each run's events in the order it numbered them
                assert seqs == sorted(set(seqs)), (table, run)
        assert not list((workdir / "spill").glob("seg-*.spill"))
    finally:
        server.stop()


def test_status_metrics_and_health_show_the_backlog_and_the_time_to_drain_it() -> None:
    """Queued + in flight + spilled is the backlog; at the drains' recent pace it takes backlog / pace."""
    from collector.web.health import HealthSnapshot, TableState

    now = 1_800_000_000_000_000
    figures = SpillFigures(
        envelopes=9_000,
        bytes=3_150_000,
        segments=2,
        oldest_us=now - 90_000_000,
        spilling=True,
        queue_bytes=500_000,
        cap_bytes=512_000,
        drain_rate=1_000.0,
        disk_free_bytes=80_000_000_000,
        updated_us=now,
    )
    tables = [TableState("agg_trades", 900, 100, now), TableState("depth_updates", 0, 0, now)]
    snap = HealthSnapshot(redis_up=True, postgres_up=True, tables=tables, spill=figures)
    backlog = snap.backlog
    assert (backlog.total, backlog.eta_s) == (10_000, 10.0)
    body = assess(snap, now, load_settings()).body["backlog"]
    assert body["total"] == 10_000 and body["spilled"] == 9_000 and body["eta_s"] == 10.0
    assert body["spill_bytes"] == 3_150_000 and body["oldest_spill_age_s"] == 90.0
    exported = {m.name: m.samples[0].value for m in families(snap, now) if m.samples}
    assert exported["collector_backlog_drain_eta_seconds"] == 10.0
    assert exported["collector_spill_envelopes"] == 9_000 and exported["collector_spill_bytes"] == 3_150_000
    from collector.web.status import format_status

    text = format_status(snap, assess(snap, now, load_settings()), now)
    assert (
        "backlog: 10,000 = 900 in Redis + 100 in flight + 9,000 spilled; drains 1,000/s, about 10s to drain"
        in text
    )
    assert "spill: 3.1 MB on disk in 2 segment(s), oldest 1m30s ago, 80.00 GB free" in text


def test_what_the_sink_spills_counts_as_queued_and_comes_back_in_order(
    redis_url: str, tmp_path: Path
) -> None:
    """At every moment the audit's queued number of the run is what Redis holds plus what waits on
    disk; as the list is emptied the spill comes back behind it in numbering order."""
    from collector.queue.client import async_redis_client
    from collector.streams.sink import Sink, SinkOptions
    from tests.processes import until

    client = redis.Redis.from_url(redis_url)
    options = SinkOptions(0.01, 1000, 1_000_000, 100_000, max_queue_bytes=3_000, spill_dir=tmp_path / "spill")
    settings = load_settings(redis_url=redis_url)
    taken: list[bytes] = []

    def queued_is_redis_plus_disk(run: str) -> bool:
        pipe = client.pipeline(transaction=True)  # one moment: what `collector audit` reads, at once
        pipe.hget(keys.AUDIT_QUEUED, f"{run}/agg_trades")
        pipe.llen(keys.queue("agg_trades"))
        pipe.hget(keys.spill_pending("0/1"), f"{run}/agg_trades")
        queued, length, pending = pipe.execute()
        return int(queued or 0) == 200 and int(queued) == len(taken) + int(length) + int(pending or 0)

    async def main() -> None:
        sink = Sink(async_redis_client(settings), options)
        task = asyncio.create_task(sink.run())
        for n in range(200):
            sink.push_event(
                "agg_trades", "spot", 1_700_000_000_000_000 + n, b'{"data":{"s":"BTCUSDT","a":%d}}' % n
            )
        spill = sink.pressure.spill
        assert spill is not None
        await until(lambda: queued_is_redis_plus_disk(sink.run_id), 30, "all 200 queued, most on disk")
        assert spill.envelopes > 100  # the cap let ~3 kB into Redis
        while len(taken) < 200:  # a drain: empty the list, the spill follows into it
            taken.extend(client.lpop(keys.queue("agg_trades"), 50) or [])
            assert queued_is_redis_plus_disk(sink.run_id)
            await until(lambda: len(taken) == 200 or client.llen(keys.queue("agg_trades")), 30, "fed back")
            assert queued_is_redis_plus_disk(sink.run_id)
        sink.stop()
        await task
        assert await sink.drain(5) == 0
        sink.close()

    asyncio.run(main())
    assert [orjson.loads(envelope)["seq"] for envelope in taken] == list(range(1, 201))
    assert not list((tmp_path / "spill").glob("seg-*.spill"))


def test_with_queue_shards_each_shard_spills_and_comes_back_on_its_own_list_in_order(
    redis_url: str, tmp_path: Path
) -> None:
    """QUEUE_SHARDS=2: a shard's spilled envelopes come back to that shard's list, numbered in order
    under the shard's run, and its queued number is always its list plus its part of the disk."""
    from collector.queue.client import async_redis_client
    from collector.queue.keys import shard_run
    from collector.queue.shards import shard_of_stream
    from collector.streams.sink import Sink, SinkOptions
    from tests.processes import until

    streams = {
        shard_of_stream(f"{s}@aggTrade", 2): f"{s}@aggTrade" for s in ("btcusdt", "ethusdt", "bnbusdt")
    }
    assert set(streams) == {0, 1}, "two of these symbols must land on different shards"
    client = redis.Redis.from_url(redis_url)
    options = SinkOptions(
        0.01, 1000, 1_000_000, 100_000, max_queue_bytes=3_000, spill_dir=tmp_path / "spill", queue_shards=2
    )
    settings = load_settings(redis_url=redis_url)
    taken: dict[int, list[bytes]] = {0: [], 1: []}
    runs: list[str] = []

    def balanced(run: str, shard: int) -> bool:
        pipe = client.pipeline(transaction=True)
        pipe.hget(keys.AUDIT_QUEUED, f"{shard_run(run, shard)}/agg_trades")
        pipe.llen(keys.queue("agg_trades", shard))
        pipe.hget(keys.spill_pending("0/1"), f"{shard_run(run, shard)}/agg_trades")
        queued, length, pending = pipe.execute()
        return int(queued or 0) == 100 and int(queued) == len(taken[shard]) + int(length) + int(pending or 0)

    async def main() -> None:
        sink = Sink(async_redis_client(settings), options)
        runs.append(sink.run_id)
        task = asyncio.create_task(sink.run())
        for n in range(200):
            frame = b'{"data":{"s":"X","a":%d}}' % n
            sink.push_event("agg_trades", "spot", 1_700_000_000_000_000 + n, frame, streams[n % 2])
        spill = sink.pressure.spill
        assert spill is not None
        await until(lambda: balanced(sink.run_id, 0) and balanced(sink.run_id, 1), 30, "all queued")
        assert spill.envelopes > 100
        while sum(map(len, taken.values())) < 200:
            for shard in (0, 1):
                taken[shard].extend(client.lpop(keys.queue("agg_trades", shard), 50) or [])
            assert balanced(sink.run_id, 0) and balanced(sink.run_id, 1)
            await until(
                lambda: (
                    sum(map(len, taken.values())) == 200
                    or client.llen(keys.queue("agg_trades", 0)) + client.llen(keys.queue("agg_trades", 1))
                ),
                30,
                "fed back",
            )
        sink.stop()
        await task
        assert await sink.drain(5) == 0
        sink.close()

    asyncio.run(main())
    for shard in (0, 1):
        envelopes = [orjson.loads(envelope) for envelope in taken[shard]]
        assert {e["run"] for e in envelopes} == {shard_run(runs[0], shard)}
        assert [e["seq"] for e in envelopes] == list(range(1, 101))
        assert {e["frame"]["data"]["a"] % 2 for e in envelopes} == {shard}  # event n went to streams[n % 2]
