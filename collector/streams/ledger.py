"""The stream process's gap ledger: depth sequence breaks with their resync, and stream outages.

The I/O shell around `collector.gaps.depth.DepthTracker`:
- `on_depth()` runs on the receive path for every diff-depth event: a dict lookup and two integer
  comparisons; records and snapshot requests it decides on are queued, never awaited.
- Gap records go into the sink like events (tables `depth_gaps`, `stream_gaps`), so they reach
  PostgreSQL through the same drains, in order with the data around them.
- Resync snapshots are fetched by one worker per market, one request at a time, through the same
  REST client as the scheduled polls (timeouts, retries, the shared 429/418 pause), in a thread so
  the event loop never waits on HTTP. The body is queued for `depth_snapshots` like a polled one.
- Open gaps are mirrored to Redis (`keys.OPEN_GAPS`) for /health and `collector gaps`; at a clean
  shutdown the last update id of every symbol and the streams' open outages are saved there too,
  so the next start checks continuity across the restart and closes the outage it began.
- A stream no longer recorded (its symbol delisted, or dropped from the settings) leaves the ledger:
  its open outage ends when it is let go, its depth chain is forgotten, and a depth gap still open
  in it is closed with no resync snapshot (`resync_update_id` null), since none will ever come.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator
from typing import Any, Final

import orjson
import redis.asyncio

from collector.binance.streams import stream_symbol, table_for_stream
from collector.gaps.depth import Decisions, DepthTracker
from collector.gaps.records import DepthGap, StreamGap
from collector.queue import counters, keys
from collector.queue.envelope import make_envelope
from collector.queue.stream_shards import STOPPED
from collector.streams.backoff import backoff_delays
from collector.streams.registry import Heartbeat
from collector.streams.shard import Shard
from collector.streams.sink import Sink
from collector.streams.state import ConnectionState

logger = logging.getLogger(__name__)

RESYNC_RETRY_INITIAL_S: Final = 1.0
RESYNC_RETRY_MAX_S: Final = 30.0
MIRROR_INTERVAL_S: Final = 1.0

# (market, symbol) -> (REST body, receive time µs), or None when the request failed.
SnapshotFetcher = Callable[[str, str], Awaitable[tuple[bytes, int] | None]]


def now_us() -> int:
    return time.time_ns() // 1000


def depth_symbols(state: ConnectionState) -> list[str]:
    """The symbols whose diff depth this connection carries (`btcusdt@depth@100ms` -> BTCUSDT)."""
    return [
        name.split("@", 1)[0].upper() for name in state.streams if table_for_stream(name) == "depth_updates"
    ]


class GapLedger:
    """Feeds the depth tracker, queues gap records, fetches resync snapshots, records outages."""

    def __init__(
        self,
        sink: Sink,
        fetch: SnapshotFetcher,
        tracker: DepthTracker | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self._sink = sink
        # This process's shard record, rewritten with every mirror (collector.streams.registry).
        self.heartbeat = heartbeat or Heartbeat(Shard(), sink.run_id)
        self._mirrored: set[str] = set()  # the `keys.OPEN_GAPS` fields this process wrote last
        self._fetch = fetch
        self.tracker = tracker or DepthTracker()
        self._requests: dict[str, asyncio.Queue[str]] = {}
        self._retry_delays: dict[tuple[str, str], Iterator[float]] = {}
        self.open_streams: dict[tuple[str, str], StreamGap] = {}  # (market, stream) -> outage
        self._opened: list[tuple[str, str, str]] = []  # (kind, market, cause) not yet counted
        self._chain_streams: dict[tuple[str, str], str] = {}  # (market, symbol) -> its followed stream
        self._stopping = False
        # The previous run died without a clean stop (its heartbeat is still in Redis): from its last
        # heartbeat until each connection opens, its streams were out.
        self._crashed_at_us: int | None = None
        self._crash_recorded: set[str] = set()  # connections whose crash outage is recorded

    # --- depth: the receive path -----------------------------------------------------------------

    def on_depth(self, market: str, stream: str, data: Any, received_at_us: int, connection: str) -> bool:
        """One diff-depth event (the combined stream's `data`); False when it is a duplicate that
        another connection already delivered, so it need not be stored again. A malformed event is
        the drain's to dead-letter.

        The chain of a symbol is followed on one depth stream: a second speed of the same symbol
        (`@depth` beside `@depth@100ms`) batches updates differently, so its events are stored but
        not checked against the first one's.
        """
        if type(data) is not dict:
            return True
        symbol, first_u, final_u, previous_u = data.get("s"), data.get("U"), data.get("u"), data.get("pu")
        if type(symbol) is not str or type(first_u) is not int or type(final_u) is not int:
            return True
        followed = self._chain_streams.setdefault((market, symbol), stream)
        if followed != stream:
            return True
        decisions = self.tracker.on_event(
            market, symbol, first_u, final_u, previous_u, received_at_us, connection
        )
        self._apply(decisions)
        return not decisions.duplicate

    def _apply(self, decisions: Decisions) -> None:
        for gap in decisions.records:
            self._sink.push("depth_gaps", gap.envelope())
            if gap.resynced_at_us is None:
                self._opened.append(("depth", gap.market, gap.cause))
                logger.warning(
                    "gaps.depth_opened market=%s symbol=%s cause=%s last_u=%s next_U=%s",
                    gap.market,
                    gap.symbol,
                    gap.cause,
                    gap.last_update_id,
                    gap.next_update_id,
                )
            else:
                logger.info(
                    "gaps.depth_resynced market=%s symbol=%s snapshot=%s after_s=%.1f",
                    gap.market,
                    gap.symbol,
                    gap.resync_update_id,
                    (gap.resynced_at_us - gap.detected_at_us) / 1e6,
                )
        for market, symbol in decisions.fetch:
            self._queue(market).put_nowait(symbol)

    def _queue(self, market: str) -> asyncio.Queue[str]:
        queue = self._requests.get(market)
        if queue is None:
            queue = self._requests[market] = asyncio.Queue()
        return queue

    # --- resync snapshots ------------------------------------------------------------------------

    async def run(self, client: redis.asyncio.Redis) -> None:
        """Fetch the snapshots asked for (one worker per market) and mirror open gaps to Redis."""
        workers = [
            asyncio.create_task(self._resync_worker(m), name=f"resync-{m}") for m in ("spot", "futures")
        ]
        try:
            while not self._stopping:
                await asyncio.sleep(MIRROR_INTERVAL_S)
                await self._mirror(client)
        finally:
            for worker in workers:
                worker.cancel()

    def stop(self) -> None:
        self._stopping = True

    async def _resync_worker(self, market: str) -> None:
        queue = self._queue(market)
        while True:
            symbol = await queue.get()
            try:
                fetched = await self._fetch(market, symbol)
            except Exception:  # this worker must outlive any one request: it retries with backoff
                logger.exception("gaps.resync_error market=%s symbol=%s", market, symbol)
                fetched = None
            if fetched is None:
                # Failed after the REST client's own retries: ask again later, backing off per symbol.
                delays = self._retry_delays.setdefault(
                    (market, symbol), backoff_delays(RESYNC_RETRY_INITIAL_S, RESYNC_RETRY_MAX_S)
                )
                delay = next(delays)
                logger.warning(
                    "gaps.resync_failed market=%s symbol=%s retry_in_s=%.1f", market, symbol, delay
                )
                asyncio.get_running_loop().call_later(delay, self._retry, market, symbol)
                continue
            self._retry_delays.pop((market, symbol), None)
            body, received_at_us = fetched
            snapshot_id = _last_update_id(body)
            self._sink.push("depth_snapshots", make_envelope(market, received_at_us, body, symbol=symbol))
            self._apply(self.tracker.on_snapshot(market, symbol, snapshot_id, now_us()))

    def _retry(self, market: str, symbol: str) -> None:
        self._apply(self.tracker.on_snapshot(market, symbol, None, now_us()))

    # --- stream outages: the connection lifecycle ------------------------------------------------

    def source_opened(self, source: str) -> None:
        """One physical connection (`<id>#<n>`) started delivering."""
        self.tracker.source_opened(source)

    def source_closed(self, source: str) -> None:
        """One physical connection ended (lost, or closed after its replacement took over)."""
        self._apply(self.tracker.source_closed(source, now_us()))

    def connection_opened(self, state: ConnectionState) -> None:
        """A connection is open and subscribed: its streams' outages end now."""
        opened_us = now_us()
        if self._crashed_at_us is not None and state.id not in self._crash_recorded:
            self._crash_recorded.add(state.id)
            for stream in state.streams:  # opened here, closed just below like any other outage
                self._open_outage(state, stream, self._crashed_at_us, "crash")
        for stream in state.streams:
            gap = self.open_streams.pop((state.market, stream), None)
            if gap is not None:
                gap.ended_at_us = opened_us
                self._sink.push("stream_gaps", gap.envelope())
        self.tracker.reconnected(state.market, depth_symbols(state))

    def connection_created(self, state: ConnectionState) -> None:
        """A connection added while running (new listings): its streams were not the crashed run's."""
        self._crash_recorded.add(state.id)

    def connection_lost(self, state: ConnectionState, cause: str) -> None:
        """A connection stopped receiving: each of its streams is out from its last frame until reopened."""
        if not state.streams:
            return  # closed after its last stream was let go: nothing is out
        started_us = state.last_message_us or now_us()
        for stream in state.streams:
            self._open_outage(state, stream, started_us, cause)
        self.tracker.chain_lost(state.market, depth_symbols(state))
        # A stop the operator asked for is recorded like any outage, but is no warning.
        (logger.info if cause == "shutdown" else logger.warning)(
            "gaps.streams_out connection=%s cause=%s streams=%d since_us=%d",
            state.id,
            cause,
            len(state.streams),
            started_us,
        )

    def stream_silent(self, state: ConnectionState, stream: str, since_us: int) -> None:
        """One stream stopped while its connection kept delivering: out until its next event."""
        self._open_outage(state, stream, since_us, "stream_silence")

    def _open_outage(self, state: ConnectionState, stream: str, since_us: int, cause: str) -> None:
        """Queue the opening record of a stream's outage, unless one is open already (it goes on)."""
        key = (state.market, stream)
        if key in self.open_streams:
            return
        gap = StreamGap(state.market, stream, since_us, cause, state.id)
        self.open_streams[key] = gap
        self._sink.push("stream_gaps", gap.envelope())
        self._opened.append(("stream", state.market, cause))

    def stream_recovered(self, state: ConnectionState, stream: str, at_us: int) -> None:
        gap = self.open_streams.get((state.market, stream))
        if gap is not None and gap.cause == "stream_silence":
            del self.open_streams[(state.market, stream)]
            gap.ended_at_us = at_us
            self._sink.push("stream_gaps", gap.envelope())
            logger.info(
                "gaps.stream_recovered connection=%s stream=%s after_s=%.1f",
                state.id,
                stream,
                (at_us - gap.started_at_us) / 1e6,
            )

    # --- the symbol universe changed -------------------------------------------------------------

    def streams_added(self, market: str, streams: Iterable[str]) -> None:
        """Streams about to be subscribed: their depth chains start afresh (a relisted symbol's old
        chain, or one begun by a straggling event after its delisting, does not link to the new one)."""
        for symbol in _depth_symbols_of(streams):
            self._chain_streams.pop((market, symbol), None)
            self.tracker.forget(market, symbol)

    def streams_removed(self, market: str, streams: Iterable[str]) -> None:
        """Streams let go (delisted symbols): nothing of them stays open; see the module docstring."""
        at_us = now_us()
        names = list(streams)
        outages = depth_gaps = 0
        for stream in names:
            outage = self.open_streams.pop((market, stream), None)
            if outage is not None:
                outage.ended_at_us = at_us
                self._sink.push("stream_gaps", outage.envelope())
                outages += 1
        for symbol in _depth_symbols_of(names):
            self._chain_streams.pop((market, symbol), None)
            for gap in self.tracker.forget(market, symbol):
                gap.resynced_at_us = at_us
                self._sink.push("depth_gaps", gap.envelope())
                depth_gaps += 1
        if outages or depth_gaps:
            logger.info(
                "gaps.closed_for_removed_streams market=%s stream_outages=%d depth_gaps=%d",
                market,
                outages,
                depth_gaps,
            )

    def retire_unplanned(self, planned: Collection[tuple[str, str]]) -> None:
        """At start: what the last run left open for streams this run does not carry is closed."""
        stale: dict[str, list[str]] = {}
        for market, stream in self.open_streams:
            if (market, stream) not in planned:
                stale.setdefault(market, []).append(stream)
        followed = {(m, symbol) for m, s in planned for symbol in _depth_symbols_of([s])}
        for market, symbol in list(self.tracker.symbols):
            if (market, symbol) not in followed:
                stale.setdefault(market, []).append(f"{symbol.lower()}@depth")
        for market, streams in stale.items():
            self.streams_removed(market, streams)

    # --- Redis: monitoring mirror and restart state ----------------------------------------------

    async def _mirror(self, client: redis.asyncio.Redis) -> None:
        opened, self._opened = self._opened, []
        mapping = self.open_gap_fields()
        try:
            pipe: Any = client.pipeline(transaction=True)
            self._replace_open_gaps(pipe, mapping)
            self.heartbeat.beat(pipe)  # the heartbeat a crash leaves behind
            for kind, market, cause in opened:
                counters.incr(pipe, "gaps", kind, market, cause)
            await pipe.execute()
            self._mirrored = set(mapping)
        except (redis.RedisError, OSError, TimeoutError) as error:
            self._opened = opened + self._opened  # counted on the next mirror
            logger.debug("gaps.mirror_failed error=%s", error)

    def _replace_open_gaps(self, pipe: Any, mapping: dict[str, bytes]) -> None:
        """Make this process's fields of `keys.OPEN_GAPS` equal `mapping`; other shards' stay."""
        gone = self._mirrored - mapping.keys()
        if gone:
            pipe.hdel(keys.OPEN_GAPS, *gone)
        if mapping:
            pipe.hset(keys.OPEN_GAPS, mapping=mapping)

    def open_gap_fields(self) -> dict[str, bytes]:
        """`keys.OPEN_GAPS` fields: `depth/<market>/<symbol>/<detected µs>` and `stream/<market>/<stream>`."""
        fields: dict[str, bytes] = {}
        for gap in self.tracker.open_gaps():
            fields[f"depth/{gap.market}/{gap.symbol}/{gap.detected_at_us}"] = _depth_json(gap)
        for (market, stream), outage in self.open_streams.items():
            fields[f"stream/{market}/{stream}"] = orjson.dumps(
                {
                    "started_at_us": outage.started_at_us,
                    "cause": outage.cause,
                    "connection": outage.connection,
                }
            )
        return fields

    async def save(self, client: redis.asyncio.Redis) -> None:
        """At a clean shutdown, after the last flush: what the next start needs to continue the ledger.

        Only this shard's fields are written (`load` took its old ones): other shards keep theirs.
        """
        last_u = {
            f"{market}/{symbol}": state.last_u
            for (market, symbol), state in self.tracker.symbols.items()
            if state.last_u is not None
        }
        outages = {f"{m}/{s}": orjson.dumps(_stream_json(g)) for (m, s), g in self.open_streams.items()}
        pipe: Any = client.pipeline(transaction=True)
        if last_u:
            pipe.hset(keys.DEPTH_LAST_UPDATE_ID, mapping=last_u)
        if outages:
            pipe.hset(keys.STREAM_OUTAGES, mapping=outages)
        fields = self.open_gap_fields()
        self._replace_open_gaps(pipe, fields)
        self.heartbeat.beat(pipe, STOPPED)
        await pipe.execute()
        self._mirrored = set(fields)

    async def load(self, client: redis.asyncio.Redis, crashed_alive_us: int | None = None) -> None:
        """At start: this shard's part of the previous runs' last update ids, open outages and open
        gaps (then forgotten in Redis). `crashed_alive_us`: the last heartbeat of a run that crashed
        (`collector.streams.registry.claim`)."""
        shard = self.heartbeat.shard
        pipe: Any = client.pipeline(transaction=False)
        pipe.hgetall(keys.DEPTH_LAST_UPDATE_ID)
        pipe.hgetall(keys.STREAM_OUTAGES)
        pipe.hkeys(keys.OPEN_GAPS)
        last_u_all, outages_all, open_fields = await pipe.execute()
        # Fields are `<market>/<symbol>` and `<market>/<stream>`: each goes to the shard owning it now.
        last_u_raw = {
            k.decode(): v for k, v in last_u_all.items() if shard.owns_symbol(k.decode().partition("/")[2])
        }
        outages_raw = {
            k.decode(): v for k, v in outages_all.items() if shard.owns_stream(k.decode().partition("/")[2])
        }
        open_gone = [f.decode() for f in open_fields if _owns_gap_field(shard, f.decode())]
        pipe = client.pipeline(transaction=True)
        if last_u_raw:
            pipe.hdel(keys.DEPTH_LAST_UPDATE_ID, *last_u_raw)
        if outages_raw:
            pipe.hdel(keys.STREAM_OUTAGES, *outages_raw)
        if open_gone:
            pipe.hdel(keys.OPEN_GAPS, *open_gone)
        await pipe.execute()
        last_u = {}
        for name, value in last_u_raw.items():
            market, _, symbol = name.partition("/")
            last_u[(market, symbol)] = int(value)
        if crashed_alive_us is not None:
            # Events received after the dead run's last flush were lost; that flush may have come
            # just before its last heartbeat, so the outage starts one heartbeat interval earlier.
            self._crashed_at_us = crashed_alive_us - int(MIRROR_INTERVAL_S * 1e6)
            logger.warning(
                "gaps.previous_run_crashed shard=%s last_alive_us=%s action=record outages and resync "
                "every symbol",
                shard.label,
                self._crashed_at_us,
            )
        self.tracker = DepthTracker(last_u, after_crash=self._crashed_at_us is not None)
        for name, value in outages_raw.items():
            market, _, stream = name.partition("/")
            record = orjson.loads(value)
            self.open_streams[(market, stream)] = StreamGap(
                market, stream, record["started_at_us"], record["cause"], record["connection"]
            )
        if last_u or outages_raw:
            logger.info("gaps.restored symbols=%d stream_outages=%d", len(last_u), len(outages_raw))


def _owns_gap_field(shard: Shard, name: str) -> bool:
    """Whether `shard` owns an open gap: `depth/<market>/<symbol>/<µs>` or `stream/<market>/<stream>`."""
    parts = name.split("/")
    if len(parts) < 3:
        return shard.index == 0  # unreadable: someone must clean it, and shard 0 always runs
    return shard.owns_symbol(parts[2]) if parts[0] == "depth" else shard.owns_stream(parts[2])


def _depth_symbols_of(streams: Iterable[str]) -> set[str]:
    """The symbols whose diff depth these streams carry."""
    symbols = set()
    for stream in streams:
        symbol = stream_symbol(stream)
        if symbol is not None and table_for_stream(stream) == "depth_updates":
            symbols.add(symbol)
    return symbols


def _last_update_id(body: bytes) -> int | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = parsed.get("lastUpdateId") if isinstance(parsed, dict) else None
    return value if type(value) is int else None


def _depth_json(gap: DepthGap) -> bytes:
    return orjson.dumps(
        {
            "market": gap.market,
            "symbol": gap.symbol,
            "detected_at_us": gap.detected_at_us,
            "last_update_id": gap.last_update_id,
            "next_update_id": gap.next_update_id,
            "cause": gap.cause,
        }
    )


def _stream_json(gap: StreamGap) -> dict[str, object]:
    return {"started_at_us": gap.started_at_us, "cause": gap.cause, "connection": gap.connection}
