"""The spill: its segment format, damage and restarts, and backpressure on the Redis queues."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from collector.queue.envelope import make_envelope
from collector.queue.spill_stats import drain_eta_s
from collector.streams.pressure import QueueGauge, split
from collector.streams.spill import Groups, Spill
from collector.streams.spill_format import SegmentHeader, encode_header, encode_records, parse_records

KEY = "collector:queue:agg_trades"


def tagged(run: str, seq: int) -> bytes:
    """An aggTrade envelope numbered `seq` in `run`, as the stream process queues it."""
    frame = b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","s":"BTCUSDT","a":%d}}' % seq
    return make_envelope("spot", 1_700_000_000_000_000 + seq, frame, audit=f',"run":"{run}","seq":{seq}'.encode())


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
    assert [(r.key, r.table, r.envelope) for r in whole.records] == [(KEY, "agg_trades", e) for e in envelopes]
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
    caplog.set_level(logging.INFO, logger="collector.streams.spill")
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
        assert path.stat().st_size == len(encode_header(SegmentHeader("r1-1", 1_700_000_000_000_000))) + len(whole)
        assert read_all(spill) == [tagged("r1-1", n) for n in (1, 2, 3)]
        assert spill.envelopes == 0 and not list((tmp_path / "spill").glob("seg-*"))  # fed: deleted
    finally:
        spill.close()


def test_a_bad_checksum_is_skipped_with_a_clear_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
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
        with pytest.raises(ConfigError, match="SPILL_DIR: .* is in use by another stream process"):
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
