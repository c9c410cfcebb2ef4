"""Several stream shards spilling at once: each its own directory and its own hashes in Redis, and the
readers (`collector audit`, /health) counting every shard's spill, a stopped one's too."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path

import orjson
import redis

from collector.queue import keys
from collector.queue.client import async_redis_client
from collector.queue.spill_stats import (
    SpillFigures,
    combine_figures,
    merge_pending,
    read_figures,
    read_pending,
)
from collector.settings import Settings, load_settings
from collector.streams.shard import Shard, other_split, spill_dir
from collector.streams.sink import Sink, SinkOptions
from collector.streams.spill import Spill
from collector.streams.spill_segments import stranded
from collector.web.health import snapshot
from tests.processes import until

EVENTS = 200  # per shard; a 3 kB cap lets about a tenth of them into Redis
LABELS = ("0/2", "1/2")


def figures(envelopes: int, **changes: object) -> SpillFigures:
    base = SpillFigures(
        envelopes=envelopes,
        bytes=envelopes * 100,
        segments=1,
        oldest_us=1_000,
        spilling=True,
        queue_bytes=5_000,
        cap_bytes=8_000,
        drain_rate=10.0,
        disk_free_bytes=1_000_000,
        updated_us=2_000,
    )
    return dataclasses.replace(base, **changes)


def test_shards_figures_add_up_where_each_holds_its_own_and_not_where_all_see_the_same_lists() -> None:
    """Envelopes, bytes and segments add up; spilling if any is; the oldest segment and the least free
    disk are kept; the lists' bytes, the cap and the drains' pace are every shard's view: the largest."""
    one = figures(10, oldest_us=5_000, queue_bytes=7_000, drain_rate=3.0, updated_us=9_000)
    two = figures(
        4, segments=2, oldest_us=None, spilling=False, disk_free_bytes=None, queue_bytes=6_000, drain_rate=4.5
    )
    three = figures(
        0, segments=0, oldest_us=None, spilling=False, drain_rate=0.0, disk_free_bytes=500, updated_us=1
    )
    combined = combine_figures([one, None, two, three])
    assert combined == SpillFigures(
        envelopes=14,
        bytes=1_400,
        segments=3,
        oldest_us=5_000,
        spilling=True,
        queue_bytes=7_000,
        cap_bytes=8_000,
        drain_rate=4.5,
        disk_free_bytes=500,
        updated_us=9_000,
    )
    assert combine_figures([one]) == one
    assert combine_figures([]) is None and combine_figures([None]) is None


def test_shards_pending_merge_by_run_and_a_repeated_field_is_not_counted_twice() -> None:
    """Each shard's runs are its own fields; a field found in two hashes keeps the larger count."""
    merged = merge_pending(
        [{"r1-s0of2/agg_trades": 5}, {}, {"r2-s1of2/agg_trades": 7, "r1-s0of2/agg_trades": 3}]
    )
    assert merged == {"r1-s0of2/agg_trades": 5, "r2-s1of2/agg_trades": 7}


def test_each_shard_spills_to_its_own_directory_and_two_on_one_host_both_start(tmp_path: Path) -> None:
    """Unsharded keeps SPILL_DIR itself (an existing spill resumes); shard i/n of n > 1 takes
    SPILL_DIR/shard-<i>of<n>, so two shards with the same SPILL_DIR both lock their directory."""
    base = tmp_path / "spill"
    assert spill_dir(base, Shard()) == base
    assert spill_dir(base, Shard(1, 2)) == base / "shard-1of2"
    whole = SinkOptions.from_settings(load_settings(spill_dir=base))
    assert (whole.spill_dir, whole.stream_shard) == (base, "0/1")
    options = [
        SinkOptions.from_settings(load_settings(spill_dir=base, stream_shard=label)) for label in LABELS
    ]
    assert [(o.spill_dir, o.stream_shard) for o in options] == [
        (base / "shard-0of2", "0/2"),
        (base / "shard-1of2", "1/2"),
    ]
    spills = [Spill(o.spill_dir, f"r1-1-s{i}of2") for i, o in enumerate(options) if o.spill_dir]
    for spill in spills:
        spill.open()  # the second would be refused if they shared a directory
    for spill in spills:
        spill.close()
    assert sorted(p.name for p in base.iterdir()) == ["shard-0of2", "shard-1of2"]


def test_a_spill_left_by_another_split_into_shards_is_found(tmp_path: Path) -> None:
    """Segments in SPILL_DIR itself (unsharded) or under another shard count are found for a warning;
    the directories of the current split, spilled or not, are not."""
    base = tmp_path / "spill"
    for directory in (base, base / "shard-1of2", base / "shard-0of3", base / "shard-2of3"):
        directory.mkdir(parents=True)
        (directory / "seg-000000000001.spill").write_bytes(b"")
    (base / "shard-1of3").mkdir()  # empty: nothing to feed back
    assert stranded(base, Shard(0, 3)) == {base: 1, base / "shard-1of2": 1}
    assert stranded(base, Shard()) == {base / d: 1 for d in ("shard-1of2", "shard-0of3", "shard-2of3")}
    assert stranded(base, Shard(1, 2)) == {base: 1, base / "shard-0of3": 1, base / "shard-2of3": 1}
    assert stranded(tmp_path / "none", Shard(1, 2)) == {}
    assert other_split("", Shard(0, 2)) and not other_split("", Shard())
    assert other_split("shard-0of3", Shard(0, 2)) and not other_split("shard-1of2", Shard(0, 2))
    assert not other_split("lost+found", Shard(0, 2))


def _runs_in_list(client: redis.Redis) -> Counter[str]:
    return Counter(orjson.loads(raw)["run"] for raw in client.lrange(keys.queue("agg_trades"), 0, -1))


def test_two_shards_spilling_at_once_keep_each_others_pending_and_both_are_counted(
    settings: Settings, tmp_path: Path
) -> None:
    """Two shards' sinks past the cap on one Redis: neither's publish erases the other's pending, so
    `collector audit`'s reading balances each run (queued = in the list + on disk) and /health's
    backlog counts both spills; once one shard stops, its spill still counts while the other publishes."""
    client = redis.Redis.from_url(settings.redis_url)
    runs = {label: f"r1-{i}-s{i}of2" for i, label in enumerate(LABELS)}

    def options(label: str) -> SinkOptions:
        index = LABELS.index(label)
        return SinkOptions(
            0.01,
            1000,
            1_000_000,
            100_000,
            max_queue_bytes=3_000,
            spill_dir=spill_dir(tmp_path / "spill", Shard(index, 2)),
            stream_shard=label,
        )

    def on_disk(sinks: dict[str, Sink]) -> dict[str, int]:
        """Each run's envelopes on its sink's disk, as the sinks themselves count them."""
        return {f"{runs[label]}/agg_trades": sink.pressure.spill.envelopes for label, sink in sinks.items()}  # type: ignore[union-attr]

    def audit_balances(sinks: dict[str, Sink]) -> bool:
        """What `collector audit` reads, in its order: every run queued = in the list + on disk."""
        queued = {k.decode(): int(v) for k, v in client.hgetall(keys.AUDIT_QUEUED).items()}
        spilled = read_pending(client)
        in_list = _runs_in_list(client)
        return spilled == on_disk(sinks) and all(
            queued.get(f"{run}/agg_trades") == EVENTS == in_list[run] + spilled[f"{run}/agg_trades"]
            for run in runs.values()
        )

    async def main() -> None:
        redis_async = async_redis_client(settings)
        sinks = {label: Sink(redis_async, options(label), run=runs[label]) for label in LABELS}
        tasks = [asyncio.create_task(sink.run()) for sink in sinks.values()]
        for n in range(EVENTS):
            for sink in sinks.values():
                frame = b'{"data":{"s":"BTCUSDT","a":%d}}' % n
                sink.push_event("agg_trades", "spot", 1_700_000_000_000_000 + n, frame, "btcusdt@aggTrade")
        await until(lambda: audit_balances(sinks), 30, "both shards' events queued, most on disk")
        assert all(
            sink.pressure.spill and sink.pressure.spill.envelopes > EVENTS // 2 for sink in sinks.values()
        )
        for label, sink in sinks.items():  # each in its own hash, named by its label
            own = {k.decode(): int(v) for k, v in client.hgetall(keys.spill_pending(label)).items()}
            assert own == {f"{runs[label]}/agg_trades": sink.pressure.spill.envelopes}  # type: ignore[union-attr]
        # Several more publishes of each (one a second at the least): the other's pending stays.
        marks = {label: client.hget(keys.spill(label), "updated_us") for label in LABELS}
        await until(
            lambda: all(client.hget(keys.spill(label), "updated_us") != marks[label] for label in LABELS),
            30,
            "both shards published again",
        )
        assert audit_balances(sinks)
        snap = snapshot(settings, client, log_changes=False)  # what /health, /metrics and status read
        total = sum(on_disk(sinks).values())
        assert snap.spill is not None and snap.spill.envelopes == total == read_figures(client).envelopes  # type: ignore[union-attr]
        assert snap.backlog.spilled == total and snap.backlog.total == total + sum(
            _runs_in_list(client).values()
        )
        assert snap.spill.segments == 2 and snap.spill.spilling

        # Shard 1/2 stops: its spill stays on its disk for its next start, and still counts.
        stopped = sinks["1/2"]
        stopped.stop()
        await tasks[1]
        assert await stopped.drain(5) == 0
        stopped.close()
        mark = client.hget(keys.spill("0/2"), "updated_us")
        await until(lambda: client.hget(keys.spill("0/2"), "updated_us") != mark, 30, "shard 0/2 published")
        assert audit_balances(sinks)
        assert snapshot(settings, client, log_changes=False).backlog.spilled == total
        sinks["0/2"].stop()
        await tasks[0]
        assert await sinks["0/2"].drain(5) == 0
        sinks["0/2"].close()
        await redis_async.aclose()

    asyncio.run(main())


def test_the_readers_find_every_shards_hashes_and_an_empty_pending_is_no_hash(redis_url: str) -> None:
    """Whatever the shard labels, SCAN finds each shard's hashes; a shard's empty pending deletes its
    hash (the others stay), and its figures still count."""
    from collector.queue import spill_stats

    label = "2/3"
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=True)
    spill_stats.publish(pipe, label, figures(0, segments=0), {"r1/agg_trades": 3})
    spill_stats.publish(pipe, "9/10", figures(2), {"r9/agg_trades": 2})
    pipe.execute()
    assert read_pending(client) == {"r1/agg_trades": 3, "r9/agg_trades": 2}
    pipe = client.pipeline(transaction=True)
    spill_stats.publish(pipe, label, figures(0, segments=0), {})
    pipe.execute()
    assert not client.exists(keys.spill_pending(label))
    assert read_pending(client) == {"r9/agg_trades": 2}
    assert read_figures(client) == figures(2)
