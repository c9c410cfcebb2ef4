"""`collector streams`: hold every planned WebSocket connection and fill the Redis queues.

With `--shard i/n` (STREAM_SHARD) the process holds only its shard's streams (`collector.streams.shard`),
after taking the shard in Redis (`collector.streams.registry`: one line and exit 2 while another live
process holds it). The loop is asyncio's; uvloop's with STREAM_UVLOOP=true when it is installed.
Start-up checks Redis (one line and exit 2 when it is unreachable) and resolves the symbol lists
(`collector.streams.symbols`: with `*_SYMBOLS=ALL`, exchangeInfo; one line and exit 2 when it fails
and no earlier list is known). While running, the lists are refreshed and connections are opened,
changed and closed to follow them; an event-loop lag monitor runs throughout. SIGTERM or SIGINT closes every
connection gracefully, flushes what is buffered (retrying Redis for SHUTDOWN_FLUSH_TIMEOUT_S),
records the connections as stopped and exits 0; 1 if anything could not be flushed or a part of the
process failed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import redis
import redis.asyncio

from collector.binance.streams import ConnectionPlan, log_stream_substitutions
from collector.queue.client import async_redis_client, check_redis, redis_client
from collector.settings import Settings
from collector.streams.connection import ConnectionOptions, StreamConnection
from collector.streams.handler import FrameHandler
from collector.streams.lag import LoopLagMonitor
from collector.streams.ledger import GapLedger
from collector.streams.limits import ConnectionAttempts
from collector.streams.placement import Carried, Placement
from collector.streams.registry import Heartbeat, beat, claim, release
from collector.streams.resync import snapshot_fetcher
from collector.streams.shard import Shard, parse_shard
from collector.streams.sink import Sink, SinkOptions
from collector.streams.spill_segments import stranded
from collector.streams.state import ConnectionState
from collector.streams.symbols import SymbolFollower, exchange_info_fetcher, resolve_symbols

logger = logging.getLogger(__name__)

SHUTDOWN_FLUSH_TIMEOUT_S: Final = 10.0
MIN_DRAIN_S: Final = 1.0


@dataclass
class StreamProcess:
    """The wiring: plans -> connections -> handlers -> one sink and one gap ledger.

    Built by `build`, driven by `serve`.
    """

    sink: Sink
    ledger: GapLedger
    options: ConnectionOptions
    connections: list[StreamConnection] = field(default_factory=list)
    attempts: ConnectionAttempts = field(default_factory=ConnectionAttempts)
    follower: SymbolFollower | None = None  # refreshes the symbol lists while serving
    used_ids: set[str] = field(default_factory=set)  # every connection id this run has used
    # Connections opened while serving are watched here: one that fails fails the process.
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    # The start-up heartbeat (`registry.beat`), until the gap ledger's mirror beats instead.
    beating: asyncio.Task[None] | None = None

    def add(self, plan: ConnectionPlan) -> StreamConnection:
        """A connection for `plan`, registered with the sink (not started)."""
        state = ConnectionState.from_plan(plan)
        self.sink.register(state)
        handler = partial(_handler, state, self.sink, self.ledger)
        connection = StreamConnection(
            state, handler, self.options, events=self.ledger, attempts=self.attempts
        )
        self.connections.append(connection)
        self.used_ids.add(plan.connection_id)
        return connection

    def carried(self) -> list[Carried]:
        """What every connection carries now, for `collector.streams.placement`."""
        return [
            Carried(c.state.id, c.state.market, c.state.family, c.state.streams) for c in self.connections
        ]

    def planned_streams(self) -> set[tuple[str, str]]:
        return {(c.state.market, name) for c in self.connections for name in c.state.streams}

    async def apply_placement(self, placement: Placement) -> None:
        """Carry out a placement while serving: the ledger learns of every stream added or let go."""
        by_id = {connection.state.id: connection for connection in self.connections}
        for change in placement.changes:
            connection = by_id[change.connection_id]
            self.ledger.streams_added(connection.state.market, change.added)
            connection.change_streams(change.streams, change.url)
            self.ledger.streams_removed(connection.state.market, change.removed)
        for plan in placement.opened:
            self.ledger.streams_added(plan.market, plan.streams)
            connection = self.add(plan)
            self.ledger.connection_created(connection.state)
            connection.start().add_done_callback(self._connection_ended)
        for connection_id in placement.closed:
            connection = by_id[connection_id]
            let_go = connection.state.streams
            connection.change_streams((), connection.state.url)
            self.ledger.streams_removed(connection.state.market, let_go)
            await connection.stop()
            self.connections.remove(connection)
            self.sink.unregister(connection.state)
            logger.info("streams.connection_closed id=%s reason=no stream left", connection_id)

    def _connection_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("streams.task_failed task=%s error=%r", task.get_name(), task.exception())
            self.failed.set()


def build(
    plans: list[ConnectionPlan],
    sink: Sink,
    options: ConnectionOptions,
    ledger: GapLedger,
    follower: SymbolFollower | None = None,
) -> StreamProcess:
    """One state, handler and connection per plan, all feeding `sink` and `ledger`."""
    process = StreamProcess(sink, ledger, options, follower=follower)
    for plan in plans:
        process.add(plan)
    return process


def _handler(
    state: ConnectionState, sink: Sink, ledger: GapLedger, source: str, on_notice: Callable[[], None]
) -> FrameHandler:
    """The handler of one physical connection; `source` tells the two of a replacement apart."""
    return FrameHandler(state, sink, on_notice, ledger, source)


async def serve(
    process: StreamProcess,
    stop: asyncio.Event,
    flush_timeout_s: float,
    client: redis.asyncio.Redis,
    crashed_alive_us: int | None = None,
) -> int:
    """Run until `stop` is set (or a part fails), then shut down cleanly; returns the exit code.

    `crashed_alive_us`: the last heartbeat of an earlier run that crashed (`registry.claim`)."""
    await process.ledger.load(client, crashed_alive_us)
    process.ledger.retire_unplanned(process.planned_streams())
    sink_task = asyncio.create_task(process.sink.run(), name="sink")
    if process.beating is not None:
        process.beating.cancel()  # the ledger's mirror beats from here on
    ledger_task = asyncio.create_task(process.ledger.run(client), name="gap-ledger")
    watchers: list[asyncio.Task[Any]] = [asyncio.create_task(process.failed.wait(), name="added-connection")]
    if process.follower is not None:
        watchers.append(asyncio.create_task(process.follower.run(process), name="symbols"))
    tasks = [sink_task, ledger_task, *watchers] + [connection.start() for connection in process.connections]
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    done, _ = await asyncio.wait([stop_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = [task for task in done if task is not stop_task]
    for task in watchers:
        task.cancel()  # the follower must not change connections while they are being stopped
    for task in failed:
        error = task.exception() if not task.cancelled() else None
        logger.error("streams.task_failed task=%s error=%r", task.get_name(), error, exc_info=error)
    stop_task.cancel()
    logger.info(
        "streams.stopping connections=%d buffered=%d", len(process.connections), process.sink.buffered
    )
    await asyncio.gather(*(connection.stop() for connection in process.connections))
    # Everything received is now in the sink. Let a flush in progress finish, then drain the rest;
    # both within one deadline, so a Redis that hangs cannot hold the shutdown for long.
    deadline = time.monotonic() + flush_timeout_s
    process.sink.stop()
    if not sink_task.done():
        try:
            await asyncio.wait_for(sink_task, flush_timeout_s)
        except TimeoutError:
            pass  # cancelled mid-flush: nothing was committed, drain() writes that batch again
    process.ledger.stop()
    ledger_task.cancel()
    left = await process.sink.drain(max(deadline - time.monotonic(), MIN_DRAIN_S))
    process.sink.close()
    if not left:
        # Only once everything received is in Redis: the next start continues from here.
        try:
            await process.ledger.save(client)
        except (redis.RedisError, OSError, TimeoutError) as error:
            logger.error("streams.ledger_not_saved error=%s", error)
    logger.info("streams.stopped unflushed=%d", left)
    return 1 if left or failed else 0


async def _main(settings: Settings) -> int:
    client = async_redis_client(settings)
    blocking = redis_client(settings)  # for the REST clients and the symbol lists, used in threads
    shard = parse_shard(settings.stream_shard)
    heartbeat = Heartbeat(shard, f"r{time.time_ns() // 1000}-{os.getpid()}{shard.run_suffix}")
    # From the first moment, so the start-up (exchangeInfo, opening every connection) is measured too.
    lag = asyncio.create_task(LoopLagMonitor().run(client, shard.label), name="loop-lag")
    try:
        crashed_alive_us = await claim(client, heartbeat)
        beating = asyncio.create_task(beat(client, heartbeat), name="heartbeat")
        try:
            fetch = exchange_info_fetcher(settings, blocking)
            symbols = await resolve_symbols(settings, fetch, blocking)
        except BaseException:
            beating.cancel()
            await release(client, heartbeat, crashed_alive_us)
            raise
        sink = Sink(client, SinkOptions.from_settings(settings), run=heartbeat.run)
        sink.pressure.open()  # SPILL_DIR taken (or one line: another process has it), earlier spill resumed
        _warn_stranded(settings, shard)
        ledger = GapLedger(sink, snapshot_fetcher(settings, blocking), heartbeat=heartbeat)
        follower = SymbolFollower(settings, fetch, blocking, symbols, shard)
        plans = follower.initial_plans()
        _log_shard(shard, plans)
        process = build(plans, sink, ConnectionOptions.from_settings(settings), ledger, follower)
        process.beating = beating
        # Everything made so far (modules, settings, plans) lives as long as the process: kept out of
        # the collector's full passes, which otherwise walk it all and hold the loop tens of ms.
        gc.freeze()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _request_stop, stop, signum)
        return await serve(process, stop, SHUTDOWN_FLUSH_TIMEOUT_S, client, crashed_alive_us)
    finally:
        lag.cancel()
        await client.aclose()


def _warn_stranded(settings: Settings, shard: Shard) -> None:
    """One line per spill directory that another split into shards left segments in: no process of
    this split feeds them back (`collector audit` counts them as pending meanwhile)."""
    for directory, segments in stranded(settings.spill_dir, shard).items():
        logger.warning(
            "spill.stranded dir=%s segments=%d shard=%s hint=run the split that wrote it (%s) "
            "with this SPILL_DIR until it is fed back",
            directory,
            segments,
            shard.label,
            "unsharded" if directory == settings.spill_dir else directory.name,
        )


def _log_shard(shard: Shard, plans: list[ConnectionPlan]) -> None:
    streams = sum(len(plan.streams) for plan in plans)
    if shard.whole:
        return
    (logger.info if plans else logger.warning)(
        "streams.shard shard=%s connections=%d streams=%d%s",
        shard.label,
        len(plans),
        streams,
        "" if plans else " hint=no configured symbol hashes to this shard: it records nothing for now",
    )


def _request_stop(stop: asyncio.Event, signum: int) -> None:
    if not stop.is_set():
        logger.info("streams.signal signal=%s", signal.Signals(signum).name)
    stop.set()


def run(settings: Settings) -> int:
    """Entry point of `collector streams`; raises `ServiceUnavailable` when Redis (or, for an ALL
    market with no list known, exchangeInfo) is unreachable, `ConfigError` for a quote filter that
    matches nothing."""
    check_redis(settings)
    log_stream_substitutions(settings)
    factory = loop_factory(settings.stream_uvloop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_main(settings))


def loop_factory(want_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when wanted and installed (bench/stream_throughput.py measures the difference),
    else None: asyncio's own. Logs which one runs."""
    if want_uvloop:
        try:
            import uvloop
        except ImportError:
            logger.info("streams.event_loop loop=asyncio reason=uvloop is not installed")
            return None
        logger.info("streams.event_loop loop=uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop  # Any when not installed
        return factory
    logger.info("streams.event_loop loop=asyncio reason=STREAM_UVLOOP=false")
    return None
