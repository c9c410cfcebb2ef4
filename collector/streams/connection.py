"""One WebSocket connection held for ever: connect, hand every frame to the handler, reconnect.

The asyncio shell around `websockets`; what a frame means is the handler's business. Guarantees:
- The receive loop awaits only the socket: no Redis, no parsing beyond routing (a slow consumer is
  disconnected by Binance, binance.md §7 #6).
- `stop()` closes gracefully and keeps reading until the server's close frame, so every frame the
  server sent before it is still handed to the handler.
- No client pings: they count against Binance's 5 messages/s limit (binance.md §7 #3); the library
  still answers the server's pings. A watchdog closes a connection silent for WS_IDLE_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from collector.settings import Settings
from collector.streams.backoff import backoff_delays
from collector.streams.state import ConnectionState

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES: Final = 16 * 2**20  # a full `!markPrice@arr` frame is ~200 KB; leave ample room
# Frames websockets may hold unread before it stops reading the socket; the kernel buffers more.
MAX_QUEUED_FRAMES: Final = 4096
CLOSE_TIMEOUT_S: Final = 5.0
# recv() returns queued frames without suspending, so under load one connection could hold the
# event loop for thousands of frames; yielding this often keeps the sink and other sockets served.
YIELD_EVERY_FRAMES: Final = 256
# A connection that stayed up this long counts as healthy: the next failure starts the backoff
# again from WS_BACKOFF_INITIAL_S. A server that accepts and drops at once keeps backing off, which
# also keeps us under Binance's 300 connection attempts per 5 minutes per IP (binance.md §2).
STABLE_AFTER_S: Final = 30.0

# What the connection calls for each frame: (frame bytes exactly as received, receive time in µs).
ReceiveHandler = Callable[[bytes, int], None]


class ConnectionEvents(Protocol):
    """Told when a connection starts and stops receiving (the gap ledger records the outages)."""

    def connection_opened(self, state: ConnectionState) -> None: ...

    def connection_lost(self, state: ConnectionState, cause: str) -> None: ...


@dataclass(frozen=True)
class ConnectionOptions:
    open_timeout_s: float
    idle_timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float
    close_timeout_s: float = CLOSE_TIMEOUT_S
    stable_after_s: float = STABLE_AFTER_S

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionOptions:
        return cls(
            open_timeout_s=settings.ws_open_timeout_s,
            idle_timeout_s=settings.ws_idle_timeout_s,
            backoff_initial_s=settings.ws_backoff_initial_s,
            backoff_max_s=settings.ws_backoff_max_s,
        )


class StreamConnection:
    """Keeps the connection described by `state` open and feeds its frames to `handler`."""

    def __init__(
        self,
        state: ConnectionState,
        handler: ReceiveHandler,
        options: ConnectionOptions,
        rng: random.Random | None = None,
        events: ConnectionEvents | None = None,
    ) -> None:
        self.state = state
        self._handler = handler
        self._options = options
        self._rng = rng
        self._events = events
        self._idle_closed = False
        self._ws: ClientConnection | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._reconnect_now = False
        self._last_frame = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"ws-{self.state.id}")
        return self._task

    async def stop(self) -> None:
        """Close gracefully, handing over every frame received before the close; idempotent."""
        self._stopping = True
        self._stop_event.set()
        ws = self._ws
        if ws is not None:
            await ws.close(1000, "client stopping")
        task = self._task
        if task is not None and not task.done():
            try:
                # A close that is answered ends the receive loop by itself; the wait is the backstop.
                await asyncio.wait_for(asyncio.shield(task), self._options.close_timeout_s + 1)
            except TimeoutError:
                task.cancel()
        self.state.state = "stopped"

    def request_reconnect(self) -> None:
        """Close now and reconnect without waiting (the server announced its shutdown)."""
        self._reconnect_now = True
        ws = self._ws
        if ws is not None:
            closing = ws.close(1000, "server shutdown announced")
            self._closing = asyncio.get_running_loop().create_task(closing)

    async def run(self) -> None:
        """Connect, receive, and reconnect with backoff until `stop()`."""
        delays = self._new_delays()
        while not self._stopping:
            self.state.state = "connecting"
            received_before = self.state.messages
            up_s = await self._connect_and_receive()
            if self._stopping:
                break
            # A connection that delivered data worked: the next failure starts the backoff afresh,
            # so a server that drops connections every few seconds does not push the delay up.
            delivered = self.state.messages > received_before
            if self._reconnect_now or delivered or up_s >= self._options.stable_after_s:
                delays = self._new_delays()
            delay = 0.0 if self._reconnect_now else next(delays)
            self._reconnect_now = False
            self.state.state = "backoff"
            self.state.reconnects += 1
            logger.info("ws.reconnecting id=%s delay_s=%.2f", self.state.id, delay)
            try:
                await asyncio.wait_for(self._stop_event.wait(), delay)
            except TimeoutError:
                pass
        self.state.state = "stopped"

    def _new_delays(self) -> Iterator[float]:
        return backoff_delays(self._options.backoff_initial_s, self._options.backoff_max_s, rng=self._rng)

    async def _connect_and_receive(self) -> float:
        """One connection from handshake to close; returns how long it stayed up (0 if it never opened)."""
        state = self.state
        opening = asyncio.create_task(self._open())
        stopping = asyncio.create_task(self._stop_event.wait())
        await asyncio.wait([opening, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not opening.done():  # stop() during the handshake: nothing was received yet
            opening.cancel()
            return 0.0
        try:
            ws = opening.result()
        except (OSError, TimeoutError, WebSocketException) as error:
            state.last_error = f"connect: {type(error).__name__}: {error}"
            logger.warning("ws.connect_failed id=%s url=%s error=%s", state.id, state.url, state.last_error)
            return 0.0
        opened = time.monotonic()
        self._ws = ws
        state.state = "connected"
        state.connected_since_us = time.time_ns() // 1000
        logger.info("ws.connected id=%s url=%s streams=%d", state.id, state.url, len(state.streams))
        if self._stopping:  # stop() ran during the handshake
            await ws.close(1000, "client stopping")
        if self._events is not None:
            self._events.connection_opened(state)
        self._idle_closed = False
        watchdog = asyncio.create_task(self._watchdog(ws))
        try:
            await self._receive(ws)
        finally:
            watchdog.cancel()
            self._ws = None
            if self._events is not None:
                self._events.connection_lost(state, self._loss_cause())
        up_s = time.monotonic() - opened
        code = ws.close_code if ws.close_code is not None else 1006
        reason = ws.close_reason or ""
        if not self._stopping:
            state.last_error = f"closed: code={code} reason={reason}"
        logger.info(
            "ws.disconnected id=%s code=%s reason=%s after_s=%.1f", state.id, code, reason or "-", up_s
        )
        return up_s

    def _loss_cause(self) -> str:
        if self._stopping:
            return "shutdown"
        if self._reconnect_now:
            return "server_shutdown"
        return "idle" if self._idle_closed else "disconnect"

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

    async def _receive(self, ws: ClientConnection) -> None:
        """The hot loop: frame, receive time, handler. Ends when the connection is closed."""
        handler = self._handler
        recv = ws.recv
        clock = time.time_ns
        monotonic = time.monotonic
        batch = YIELD_EVERY_FRAMES
        try:
            while True:
                frame = await recv(decode=False)
                handler(frame, clock() // 1000)
                self._last_frame = monotonic()
                batch -= 1
                if not batch:
                    # recv() does not suspend while frames are queued; let the sink flush meanwhile.
                    batch = YIELD_EVERY_FRAMES
                    await asyncio.sleep(0)
        except ConnectionClosed:
            return

    async def _watchdog(self, ws: ClientConnection) -> None:
        """Close the connection after WS_IDLE_TIMEOUT_S without a frame (silent stalls, binance.md §7 #5)."""
        idle_timeout = self._options.idle_timeout_s
        self._last_frame = time.monotonic()
        while True:
            idle = time.monotonic() - self._last_frame
            if idle >= idle_timeout:
                logger.warning("ws.idle id=%s idle_s=%.1f", self.state.id, idle)
                self.state.last_error = f"idle for {idle:.0f}s"
                self._idle_closed = True
                await ws.close(1000, "idle")
                return
            await asyncio.sleep(idle_timeout - idle)
