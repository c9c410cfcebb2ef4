"""One WebSocket connection held for ever: connect, hand every frame to the handler, reconnect.

The asyncio shell around `websockets`; what a frame means is the handler's business. Guarantees:
- The receive loop awaits only the socket: no Redis, no parsing beyond routing (a slow consumer is
  disconnected by Binance, binance.md §7 #6).
- `stop()` closes gracefully and keeps reading until the server's close frame, so every frame the
  server sent before it is still handed to the handler.
- Make-before-break: before Binance's 24-hour cut (WS_ROTATE_AFTER_S) and on a `serverShutdown`
  notice, a replacement is opened and receiving before the old connection is closed, so nothing
  falls between them; the overlap's repeats are absorbed downstream (unique keys, depth tracker).
- Silence is noticed in seconds: a connection that delivers no data frame for many times its own
  usual gap between frames (at least WS_SILENCE_MIN_S, at most WS_IDLE_TIMEOUT_S) is closed and
  reopened. Server pings are answered by the library and are not data.
- No client pings: they count against Binance's 5 messages/s limit (binance.md §7 #3).
- The streams can change while the connection is open (`change_streams`): the socket is told with
  SUBSCRIBE/UNSUBSCRIBE, at most one message per CONTROL_MESSAGE_INTERVAL_S, and the streams it
  keeps are not touched; every later connection opens with the new list.
- Handshakes keep to Binance's connection attempts per 5 minutes (`collector.streams.limits`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from collector.settings import Settings
from collector.streams.backoff import backoff_delays
from collector.streams.limits import ATTEMPTS_PER_WINDOW, ATTEMPTS_WINDOW_S, ConnectionAttempts
from collector.streams.placement import Method, subscription_messages
from collector.streams.state import ConnectionState

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES: Final = 16 * 2**20  # a full `!markPrice@arr` frame is ~200 KB; leave ample room
# Frames websockets may hold unread before it stops reading the socket; the kernel buffers more.
MAX_QUEUED_FRAMES: Final = 4096
CLOSE_TIMEOUT_S: Final = 5.0
# recv() returns queued frames without suspending, so under load one connection could hold the
# event loop for thousands of frames; yielding this often keeps the sink and other sockets served.
YIELD_EVERY_FRAMES: Final = 64
# Bytes one socket read takes (asyncio's default is 256 KiB). websockets parses a whole read at once,
# so after any pause a full read of every connection lands in one loop turn: at ~300 B a frame, 256
# KiB on each of a dozen connections is ~10,000 frames, a quarter of a second (bench/streams_many.py).
# The rest waits in the kernel's buffer for the next turn; nothing is lost. Only plain-socket
# transports expose this: CPython's TLS transport (wss://) reads into its own 256 KiB buffer.
READ_CHUNK_BYTES: Final = 32 * 1024
# A connection that stayed up this long counts as healthy: the next failure starts the backoff
# again from WS_BACKOFF_INITIAL_S. A server that accepts and drops at once keeps backing off, which
# also keeps us under Binance's 300 connection attempts per 5 minutes per IP (binance.md §2).
STABLE_AFTER_S: Final = 30.0
# After a replacement opened, wait at most this long for its first frame before closing the old one:
# a connection of quiet streams may legitimately say nothing for a while.
REPLACEMENT_FIRST_FRAME_S: Final = 10.0
# A replacement that could not be opened is tried again this often while the old one still lives.
REPLACEMENT_RETRY_S: Final = 5.0
# Silence: the usual gap between frames is a slow moving average; a connection is silent after
# SILENCE_FACTOR of them. Until SILENCE_WARMUP_FRAMES arrived the average means little, and only
# WS_IDLE_TIMEOUT_S applies.
SILENCE_FACTOR: Final = 50.0
SILENCE_EWMA_WEIGHT: Final = 0.01
SILENCE_WARMUP_FRAMES: Final = 100
# Subscription messages: Binance allows 5 incoming messages a second on spot, 10 on USD-M, pings
# and pongs included (binance.md §2); one every 500 ms keeps far below either.
CONTROL_MESSAGE_INTERVAL_S: Final = 0.5

# What the connection calls for each frame: (frame bytes exactly as received, receive time in µs).
ReceiveHandler = Callable[[bytes, int], None]


class ConnectionEvents(Protocol):
    """Told when a connection starts and stops receiving (the gap ledger records the outages).

    A connection replaced make-before-break is never "lost": its replacement was open first.
    """

    def connection_opened(self, state: ConnectionState) -> None: ...

    def connection_lost(self, state: ConnectionState, cause: str) -> None: ...

    def stream_silent(self, state: ConnectionState, stream: str, since_us: int) -> None: ...

    def source_opened(self, source: str) -> None: ...

    def source_closed(self, source: str) -> None: ...


@dataclass(frozen=True)
class ConnectionOptions:
    open_timeout_s: float
    idle_timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float
    close_timeout_s: float = CLOSE_TIMEOUT_S
    stable_after_s: float = STABLE_AFTER_S
    silence_min_s: float = 5.0
    rotate_after_s: float = 85_800.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionOptions:
        return cls(
            open_timeout_s=settings.ws_open_timeout_s,
            idle_timeout_s=settings.ws_idle_timeout_s,
            backoff_initial_s=settings.ws_backoff_initial_s,
            backoff_max_s=settings.ws_backoff_max_s,
            silence_min_s=settings.ws_silence_min_s,
            rotate_after_s=settings.ws_rotate_after_s,
        )


class _Live:
    """One physical connection: its socket, its receive loop and watchdog, and what it has seen."""

    __slots__ = (
        "changed",
        "control_id",
        "first_frame",
        "frames",
        "gap_s",
        "last_frame",
        "next_control",
        "opened",
        "opened_us",
        "receiving",
        "source",
        "subscribed",
        "subscriber",
        "watchdog",
        "ws",
    )

    def __init__(self, ws: ClientConnection, source: str, streams: tuple[str, ...]) -> None:
        self.ws = ws
        self.source = source  # distinguishes the two connections of one plan during a replacement
        self.opened = self.last_frame = time.monotonic()
        self.opened_us = time.time_ns() // 1000
        self.frames = 0
        self.gap_s = 0.0  # moving average of the gap between frames
        self.first_frame = asyncio.Event()
        self.receiving: asyncio.Task[None] | None = None
        self.watchdog: asyncio.Task[None] | None = None
        self.next_control = 0.0  # monotonic time the next subscription message may be sent
        self.control_id = 0
        self.subscribed = set(streams)  # what this socket carries: its URL's streams, then SUBSCRIBEs
        self.changed = asyncio.Event()  # the state's streams changed: bring `subscribed` in line
        self.subscriber: asyncio.Task[None] | None = None

    def silence_limit_s(self, options: ConnectionOptions) -> float:
        if self.frames < SILENCE_WARMUP_FRAMES:
            return options.idle_timeout_s
        return min(options.idle_timeout_s, max(options.silence_min_s, SILENCE_FACTOR * self.gap_s))


class StreamConnection:
    """Keeps the connection described by `state` open and feeds its frames to a handler.

    `handler_for(source, on_notice)` makes the handler of one physical connection: `source` names
    it (`<id>#<n>`), so that the two connections of a replacement can be told apart downstream, and
    the handler calls `on_notice()` when the server announces its shutdown.
    """

    def __init__(
        self,
        state: ConnectionState,
        handler_for: Callable[[str, Callable[[], None]], ReceiveHandler],
        options: ConnectionOptions,
        rng: random.Random | None = None,
        events: ConnectionEvents | None = None,
        attempts: ConnectionAttempts | None = None,
    ) -> None:
        self.state = state
        self._handler_for = handler_for
        self._options = options
        self._rng = rng
        self._events = events
        self._attempts = attempts  # shared by the process's connections (one budget per IP)
        self._open_sockets: set[ClientConnection] = set()
        self._lives: set[_Live] = set()
        self._generation = 0
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._notice = asyncio.Event()  # the server announced its shutdown: replace the connection
        self._silence_closed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"ws-{self.state.id}")
        return self._task

    async def stop(self) -> None:
        """Close gracefully, handing over every frame received before the close; idempotent."""
        self._stopping = True
        self._stop_event.set()
        for ws in list(self._open_sockets):
            await ws.close(1000, "client stopping")
        task = self._task
        if task is not None and not task.done():
            try:
                # A close that is answered ends the receive loop by itself; the wait is the backstop.
                await asyncio.wait_for(asyncio.shield(task), self._options.close_timeout_s + 1)
            except TimeoutError:
                task.cancel()
        self.state.state = "stopped"

    def change_streams(self, streams: tuple[str, ...], url: str) -> None:
        """Carry `streams` from now on; `url` names them for every later connection.

        The open socket(s) are brought in line by their subscriber task; a stream carried before and
        after is not touched. A removed stream's counters stay (they are totals of this run), but it is
        no longer watched for silence.
        """
        state = self.state
        before = state.streams
        removed = set(before).difference(streams)
        state.streams, state.url = streams, url
        for name in set(streams).difference(before):
            # Counters are totals of this run and stay; a stream back after a delisting starts its
            # pace afresh, or its old last event would make it look silent since then.
            stats = state.stats_for(name)
            stats.last_message_us, stats.gap_us, stats.silenced_at_us = None, 0.0, None
        for name in removed:
            gone = state.stream_stats.get(name)
            if gone is not None:
                gone.silenced_at_us = None
        for live in self._lives:
            live.changed.set()

    def request_handover(self) -> None:
        """The server announced its shutdown: open a replacement now, then close this connection."""
        self._notice.set()

    async def run(self) -> None:
        """Connect, receive, replace before the server's cut, reconnect with backoff until `stop()`."""
        delays = self._new_delays()
        live: _Live | None = None
        while not self._stopping:
            if live is None:
                self.state.state = "connecting"
                live = await self._connect()
                if live is None:
                    if not self._stopping:
                        await self._pause(next(delays))
                    continue
            received_before = self.state.messages
            up_s, live = await self._hold(live)
            if live is not None or self._stopping:
                continue  # replaced make-before-break: no gap, no backoff
            # A connection that delivered data worked: the next failure starts the backoff afresh,
            # so a server that drops connections every few seconds does not push the delay up.
            delivered = self.state.messages > received_before
            noticed = self._notice.is_set()
            if noticed or delivered or up_s >= self._options.stable_after_s:
                delays = self._new_delays()
            self._notice.clear()
            await self._pause(0.0 if noticed else next(delays))
        self.state.state = "stopped"

    async def _pause(self, delay: float) -> None:
        self.state.state = "backoff"
        self.state.reconnects += 1
        logger.info("ws.reconnecting id=%s delay_s=%.2f", self.state.id, delay)
        try:
            await asyncio.wait_for(self._stop_event.wait(), delay)
        except TimeoutError:
            pass

    def _new_delays(self) -> Iterator[float]:
        return backoff_delays(self._options.backoff_initial_s, self._options.backoff_max_s, rng=self._rng)

    async def _connect(self) -> _Live | None:
        """Open one physical connection and start receiving on it; None when it could not be opened."""
        state = self.state
        if not await self._wait_attempt_slot():
            return None
        streams = state.streams  # the ones the URL names, read together with it below
        opening = asyncio.create_task(self._open())
        stopping = asyncio.create_task(self._stop_event.wait())
        await asyncio.wait([opening, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not opening.done():  # stop() during the handshake: nothing was received yet
            opening.cancel()
            return None
        try:
            ws = opening.result()
        except (OSError, TimeoutError, WebSocketException) as error:
            state.last_error = f"connect: {type(error).__name__}: {error}"
            logger.warning("ws.connect_failed id=%s url=%s error=%s", state.id, state.url, state.last_error)
            return None
        transport = ws.transport
        if hasattr(transport, "max_size"):  # asyncio's selector transport reads this much per turn
            transport.max_size = READ_CHUNK_BYTES
        self._generation += 1
        live = _Live(ws, f"{state.id}#{self._generation}", streams)
        self._open_sockets.add(ws)
        self._lives.add(live)
        if self._events is not None:
            self._events.source_opened(live.source)
        handler = self._handler_for(live.source, self.request_handover)
        live.receiving = asyncio.create_task(self._receive(live, handler))
        live.watchdog = asyncio.create_task(self._watchdog(live))
        live.subscriber = asyncio.create_task(self._subscriber(live))
        state.state = "connected"
        state.connected_since_us = time.time_ns() // 1000
        logger.info("ws.connected id=%s url=%s streams=%d", state.id, state.url, len(state.streams))
        if self._stopping:  # stop() ran during the handshake
            await ws.close(1000, "client stopping")
        if self._events is not None:
            self._events.connection_opened(state)
        return live

    async def _hold(self, live: _Live) -> tuple[float, _Live | None]:
        """Until `live` closes (-> its uptime, None) or is replaced (-> its uptime, the replacement)."""
        assert live.receiving is not None
        rotate_at = live.opened + self._options.rotate_after_s
        while True:
            notice = asyncio.create_task(self._notice.wait())
            timeout = max(0.0, rotate_at - time.monotonic())
            done, _ = await asyncio.wait(
                [live.receiving, notice], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            notice.cancel()
            if live.receiving in done:
                return self._closed(live), None
            if self._stopping:
                continue  # stop() closes every socket: the receive loop ends by itself
            reason = "server shutdown notice" if self._notice.is_set() else "age"
            self._notice.clear()
            replacement = await self._connect()
            if replacement is None:
                rotate_at = time.monotonic() + REPLACEMENT_RETRY_S
                continue
            if live.receiving.done() and self._events is not None:
                # The old one ended while the replacement was opening: the streams had a short hole.
                self._events.connection_lost(self.state, self._loss_cause())
                self._events.connection_opened(self.state)
            await self._replace(live, replacement, reason)
            return time.monotonic() - live.opened, replacement

    async def _replace(self, old: _Live, new: _Live, reason: str) -> None:
        """Close `old` once `new` delivers (or has had time to); every frame `old` got is handed over."""
        assert old.receiving is not None and new.receiving is not None
        first = asyncio.create_task(new.first_frame.wait())
        await asyncio.wait(
            [first, new.receiving], timeout=REPLACEMENT_FIRST_FRAME_S, return_when=asyncio.FIRST_COMPLETED
        )
        first.cancel()
        logger.info(
            "ws.replaced id=%s reason=%s old_up_s=%.1f new_delivering=%s",
            self.state.id,
            reason,
            time.monotonic() - old.opened,
            new.first_frame.is_set(),
        )
        await old.ws.close(1000, "replaced")
        try:
            await asyncio.wait_for(asyncio.shield(old.receiving), self._options.close_timeout_s + 1)
        except TimeoutError:
            old.receiving.cancel()
        self._forget(old)

    def _closed(self, live: _Live) -> float:
        """Bookkeeping for a connection that ended by itself (server, network, silence or stop())."""
        self._forget(live)
        state, ws = self.state, live.ws
        up_s = time.monotonic() - live.opened
        cause = self._loss_cause()
        if self._events is not None and not self._open_sockets:
            self._events.connection_lost(state, cause)
        code = ws.close_code if ws.close_code is not None else 1006
        reason = ws.close_reason or ""
        if not self._stopping:
            state.last_error = f"closed: code={code} reason={reason}"
        logger.info(
            "ws.disconnected id=%s code=%s reason=%s after_s=%.1f", state.id, code, reason or "-", up_s
        )
        self._silence_closed = False
        return up_s

    def _forget(self, live: _Live) -> None:
        if live.watchdog is not None:
            live.watchdog.cancel()
        if live.subscriber is not None:
            live.subscriber.cancel()
        self._open_sockets.discard(live.ws)
        self._lives.discard(live)
        if self._events is not None:
            self._events.source_closed(live.source)

    def _loss_cause(self) -> str:
        if self._stopping:
            return "shutdown"
        if self._notice.is_set():
            return "server_shutdown"
        return "silence" if self._silence_closed else "disconnect"

    async def _wait_attempt_slot(self) -> bool:
        """Wait until this handshake fits the attempts per 5 minutes; False when stopped meanwhile."""
        if self._attempts is None:
            return True
        wait_s = self._attempts.reserve(self.state.market, time.monotonic())
        if wait_s <= 0:
            return True
        logger.warning(
            "ws.attempts_paced id=%s wait_s=%.1f limit=%d per_s=%.0f",
            self.state.id,
            wait_s,
            ATTEMPTS_PER_WINDOW,
            ATTEMPTS_WINDOW_S,
        )
        try:
            await asyncio.wait_for(self._stop_event.wait(), wait_s)
        except TimeoutError:
            return True
        return False

    async def _subscriber(self, live: _Live) -> None:
        """Keep what `live` is subscribed to equal to the state's streams, for as long as it is open."""
        try:
            while True:
                live.changed.clear()
                messages = subscription_messages(live.subscribed, self.state.streams)
                for method, names in messages:
                    await self._send_control(live, method, names)
                    if method == "SUBSCRIBE":
                        live.subscribed.update(names)
                    else:
                        live.subscribed.difference_update(names)
                if messages:
                    logger.info(
                        "ws.subscriptions_synced id=%s source=%s messages=%d streams=%d",
                        self.state.id,
                        live.source,
                        len(messages),
                        len(live.subscribed),
                    )
                await live.changed.wait()
        except ConnectionClosed:
            return  # the next connection opens with the state's URL, which names the current streams

    async def _send_control(self, live: _Live, method: Method, names: tuple[str, ...]) -> None:
        """Send one SUBSCRIBE/UNSUBSCRIBE once the connection's message budget allows it."""
        while (wait_s := live.next_control - time.monotonic()) > 0:
            await asyncio.sleep(wait_s)
        live.next_control = time.monotonic() + CONTROL_MESSAGE_INTERVAL_S  # before the send: no overlap
        live.control_id += 1
        await live.ws.send(
            orjson.dumps({"method": method, "params": list(names), "id": live.control_id}).decode()
        )

    async def _open(self) -> ClientConnection:
        return await connect(
            self.state.url,
            open_timeout=self._options.open_timeout_s,
            ping_interval=None,  # no client pings (see the module docstring)
            compression=None,  # Binance streams are not compressed; skip the negotiation
            max_size=MAX_FRAME_BYTES,
            max_queue=MAX_QUEUED_FRAMES,
            close_timeout=self._options.close_timeout_s,
        )

    async def _receive(self, live: _Live, handler: ReceiveHandler) -> None:
        """The hot loop: frame, receive time, handler. Ends when the connection is closed."""
        recv = live.ws.recv
        clock = time.time_ns
        monotonic = time.monotonic
        weight = SILENCE_EWMA_WEIGHT
        batch = YIELD_EVERY_FRAMES
        try:
            frame = await recv(decode=False)
            handler(frame, clock() // 1000)
            live.last_frame = monotonic()
            live.frames = 1
            live.first_frame.set()
            while True:
                frame = await recv(decode=False)
                handler(frame, clock() // 1000)
                now = monotonic()
                live.gap_s += (now - live.last_frame - live.gap_s) * weight
                live.last_frame = now
                live.frames += 1
                batch -= 1
                if not batch:
                    # recv() does not suspend while frames are queued; let the sink flush meanwhile.
                    batch = YIELD_EVERY_FRAMES
                    await asyncio.sleep(0)
        except ConnectionClosed:
            return

    async def _watchdog(self, live: _Live) -> None:
        """Close a connection that stopped delivering data (silent stalls, binance.md §7 #5), and
        resubscribe a stream that stopped while the rest of its connection goes on."""
        while True:
            limit = live.silence_limit_s(self._options)
            silent = time.monotonic() - live.last_frame
            if silent < limit:
                await self._resubscribe_silent_streams(live)
            else:
                logger.warning(
                    "ws.silent id=%s silent_s=%.1f usual_gap_s=%.3f limit_s=%.1f",
                    self.state.id,
                    silent,
                    live.gap_s,
                    limit,
                )
                self.state.last_error = f"silent for {silent:.0f}s"
                self._silence_closed = True
                await live.ws.close(1000, "silent")
                return
            await asyncio.sleep(min(limit - silent, max(self._options.silence_min_s / 2, 0.05)))

    async def _resubscribe_silent_streams(self, live: _Live) -> None:
        """A stream with a steady pace that has been quiet for 50 of its usual gaps is resubscribed.

        Only streams that push on a clock (diff depth, mark price): a quiet market leaves trade and
        liquidation streams silent for minutes, and that is no outage.
        """
        now_us = time.time_ns() // 1000
        stream_stats = self.state.stream_stats
        for stream in self.state.streams:  # a stream removed with its symbol is not watched any more
            stats = stream_stats.get(stream)
            if stats is None or stats.silenced_at_us is not None or stats.last_message_us is None:
                continue
            if "@depth" not in stream and "markPrice" not in stream:
                continue
            if stats.messages < SILENCE_WARMUP_FRAMES or time.monotonic() < live.next_control:
                continue
            limit_us = max(self._options.silence_min_s * 1e6, SILENCE_FACTOR * stats.gap_us)
            # Measured on this connection only: a stream that was out with its previous connection
            # is that connection's outage, already recorded, and gets its chance on this one.
            if now_us - max(stats.last_message_us, live.opened_us) < limit_us:
                continue
            stats.silenced_at_us = now_us
            logger.warning(
                "ws.stream_silent id=%s stream=%s silent_s=%.1f usual_gap_s=%.3f action=resubscribe",
                self.state.id,
                stream,
                (now_us - stats.last_message_us) / 1e6,
                stats.gap_us / 1e6,
            )
            if self._events is not None:
                self._events.stream_silent(self.state, stream, stats.last_message_us)
            # Reserved before sending, so the subscriber task waits behind these two messages.
            live.next_control = time.monotonic() + 2 * CONTROL_MESSAGE_INTERVAL_S
            for method in ("UNSUBSCRIBE", "SUBSCRIBE"):
                live.control_id += 1
                message = orjson.dumps({"method": method, "params": [stream], "id": live.control_id})
                try:
                    await live.ws.send(message.decode())
                except ConnectionClosed:
                    return
