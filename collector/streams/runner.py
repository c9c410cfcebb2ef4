"""`collector streams`: hold every planned WebSocket connection and fill the Redis queues.

Start-up checks Redis (one line and exit 2 when it is unreachable). SIGTERM or SIGINT closes every
connection gracefully, flushes what is buffered (retrying Redis for SHUTDOWN_FLUSH_TIMEOUT_S),
records the connections as stopped and exits 0; 1 if anything could not be flushed or a part of the
process failed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import redis
import redis.asyncio

from collector.binance.streams import ConnectionPlan, connection_plans, log_stream_substitutions
from collector.queue.client import async_redis_client, check_redis, redis_client
from collector.rest.resync import snapshot_fetcher
from collector.settings import Settings
from collector.streams.connection import ConnectionOptions, StreamConnection
from collector.streams.handler import FrameHandler
from collector.streams.ledger import GapLedger
from collector.streams.sink import Sink, SinkOptions
from collector.streams.state import ConnectionState

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
    connections: list[StreamConnection] = field(default_factory=list)


def build(
    plans: list[ConnectionPlan], sink: Sink, options: ConnectionOptions, ledger: GapLedger
) -> StreamProcess:
    """One state, handler and connection per plan, all feeding `sink` and `ledger`."""
    process = StreamProcess(sink, ledger)
    for plan in plans:
        state = ConnectionState.from_plan(plan)
        sink.register(state)
        connection = StreamConnection(state, partial(_handler, state, sink, ledger), options, events=ledger)
        process.connections.append(connection)
    return process


def _handler(
    state: ConnectionState, sink: Sink, ledger: GapLedger, source: str, on_notice: Callable[[], None]
) -> FrameHandler:
    """The handler of one physical connection; `source` tells the two of a replacement apart."""
    return FrameHandler(state, sink, on_notice, ledger, source)


async def serve(
    process: StreamProcess, stop: asyncio.Event, flush_timeout_s: float, client: redis.asyncio.Redis
) -> int:
    """Run until `stop` is set (or a part fails), then shut down cleanly; returns the exit code."""
    await process.ledger.load(client)
    sink_task = asyncio.create_task(process.sink.run(), name="sink")
    ledger_task = asyncio.create_task(process.ledger.run(client), name="gap-ledger")
    tasks = [sink_task, ledger_task] + [connection.start() for connection in process.connections]
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    done, _ = await asyncio.wait([stop_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = [task for task in done if task is not stop_task]
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
    sink = Sink(client, SinkOptions.from_settings(settings))
    ledger = GapLedger(sink, snapshot_fetcher(settings, redis_client(settings)))
    process = build(connection_plans(settings), sink, ConnectionOptions.from_settings(settings), ledger)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request_stop, stop, signum)
    try:
        return await serve(process, stop, SHUTDOWN_FLUSH_TIMEOUT_S, client)
    finally:
        await client.aclose()


def _request_stop(stop: asyncio.Event, signum: int) -> None:
    if not stop.is_set():
        logger.info("streams.signal signal=%s", signal.Signals(signum).name)
    stop.set()


def run(settings: Settings) -> int:
    """Entry point of `collector streams`; raises `ServiceUnavailable` when Redis is unreachable."""
    check_redis(settings)
    log_stream_substitutions(settings)
    return asyncio.run(_main(settings))
