"""One physical WebSocket of a stream connection: its socket, receive loop, watchdog and subscriber.

`collector.streams.connection` holds a connection for ever across these sockets (reconnects,
make-before-break replacements); a `LiveSocket` lives from one handshake to its close. Guarantees:
- The receive loop awaits only the socket: no Redis, no parsing beyond routing (a slow consumer is
  disconnected by Binance, binance.md §7 #6).
- No client pings: they count against Binance's 5 messages/s limit (binance.md §7 #3). Server pings
  are answered by the library and are not data.
- The watchdog closes the socket when `collector.streams.silence` judges it silent, and resubscribes
  a clock-driven stream that went quiet while the rest of the socket delivers.
- The subscriber keeps the socket's subscriptions equal to the connection's streams
  (`collector.streams.subscriptions`: paced SUBSCRIBE/UNSUBSCRIBE).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from collector.streams.silence import Pace, SilencePolicy, Verdict, judge_connection, silent_streams
from collector.streams.state import ConnectionState
from collector.streams.subscriptions import SocketSubscriptions

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES: Final = 16 * 2**20  # a full `!markPrice@arr` frame is ~200 KB; leave ample room
# Frames websockets may hold unread before it stops reading the socket; the kernel buffers more.
MAX_QUEUED_FRAMES: Final = 4096
# recv() returns queued frames without suspending, so under load one connection could hold the
# event loop for thousands of frames; yielding this often keeps the sink and other sockets served.
YIELD_EVERY_FRAMES: Final = 64
# Bytes one socket read takes (asyncio's default is 256 KiB). websockets parses a whole read at once,
# so after any pause a full read of every connection lands in one loop turn: at ~300 B a frame, 256
# KiB on each of a dozen connections is ~10,000 frames, a quarter of a second (bench/streams_many.py).
# The rest waits in the kernel's buffer for the next turn; nothing is lost. CPython's TLS transport
# (wss://, what production uses) reads into a 256 KiB buffer of its own and decrypts all of it in the
# same turn: `bound_reads` shrinks that buffer too (12 connections at full rate, the loop held 200 ms:
# one read handed websockets up to ~400 KiB before, at most ~80 KiB after).
READ_CHUNK_BYTES: Final = 32 * 1024

# What a socket calls for each frame: (frame bytes exactly as received, receive time in µs).
ReceiveHandler = Callable[[bytes, int], None]
# Told when one stream is judged silent: (stream, its last event in µs).
StreamSilent = Callable[[str, int], None]


@dataclass(frozen=True)
class Closed:
    """How a socket ended by itself: its close frame, uptime and cause (the gap ledger's words)."""

    code: int
    reason: str
    up_s: float
    cause: str
    silence: Verdict | None  # what the watchdog saw, when it closed the socket for silence


async def open_socket(url: str, open_timeout_s: float, close_timeout_s: float) -> ClientConnection:
    """The handshake; raises OSError, TimeoutError or WebSocketException when it fails."""
    ws = await connect(
        url,
        open_timeout=open_timeout_s,
        ping_interval=None,  # no client pings (see the module docstring)
        compression=None,  # Binance streams are not compressed; skip the negotiation
        max_size=MAX_FRAME_BYTES,
        max_queue=MAX_QUEUED_FRAMES,
        close_timeout=close_timeout_s,
    )
    bound_reads(ws.transport, READ_CHUNK_BYTES)
    return ws


def bound_reads(transport: object, size: int) -> str:
    """Make one loop turn read at most `size` bytes of this socket; returns which transport it bounded
    (`tcp`, `tls`), or `none` for one that exposes no bound (uvloop's: a fixed 256 KB per read).

    These are asyncio's private attributes (3.11 to 3.13), set only where they exist: on another
    version or loop the read size stays the default, which costs loop latency, never data.
    """
    ssl_protocol = getattr(transport, "_ssl_protocol", None)
    if ssl_protocol is not None:
        # asyncio.sslproto.SSLProtocol: get_buffer() hands the socket its whole `_ssl_buffer`, and
        # _do_read() decrypts everything it holds, `max_size` at a time: both shrink. While
        # websockets pauses reading (its frame queue is full) the encrypted bytes pile up to the
        # read high-water mark (256 KiB) and are all decrypted in the turn it resumes: that too.
        needed = ("max_size", "_ssl_buffer", "_ssl_buffer_view", "_set_read_buffer_limits")
        if not all(hasattr(ssl_protocol, name) for name in needed):
            return "none"
        ssl_protocol.max_size = size
        ssl_protocol._ssl_buffer = bytearray(size)
        ssl_protocol._ssl_buffer_view = memoryview(ssl_protocol._ssl_buffer)
        ssl_protocol._set_read_buffer_limits(high=size)
        return "tls"
    if hasattr(transport, "max_size"):  # asyncio's selector transport reads this much per turn
        transport.max_size = size
        return "tcp"
    return "none"


class LiveSocket:
    """One open socket of `state`'s connection and its three tasks; `start` them, `forget` at the end."""

    __slots__ = (
        "_on_stream_silent",
        "_policy",
        "_state",
        "first_frame",
        "opened",
        "opened_us",
        "pace",
        "receiving",
        "silence",
        "source",
        "subscriber",
        "subscriptions",
        "watchdog",
        "ws",
    )

    def __init__(
        self,
        ws: ClientConnection,
        source: str,
        streams: tuple[str, ...],
        state: ConnectionState,
        policy: SilencePolicy,
        on_stream_silent: StreamSilent | None = None,
    ) -> None:
        self.ws = ws
        self.source = source  # distinguishes the two sockets of one connection during a replacement
        self._state = state
        self._policy = policy
        self._on_stream_silent = on_stream_silent
        self.opened = time.monotonic()
        self.opened_us = time.time_ns() // 1000
        self.pace = Pace(self.opened)
        self.first_frame = asyncio.Event()
        self.silence: Verdict | None = None  # what the watchdog saw, if it closed the socket
        self.subscriptions = SocketSubscriptions(ws.send, streams)  # `streams`: what its URL names
        self.receiving: asyncio.Task[None] | None = None
        self.watchdog: asyncio.Task[None] | None = None
        self.subscriber: asyncio.Task[None] | None = None

    def start(self, handler: ReceiveHandler) -> asyncio.Task[None]:
        """Start receiving, watching and subscribing; the returned receive task ends with the socket."""
        self.receiving = asyncio.create_task(self._receive(handler))
        self.watchdog = asyncio.create_task(self._watchdog())
        self.subscriber = asyncio.create_task(self._subscriber())
        return self.receiving

    def ended(self, cause: str) -> Closed:
        """How this socket ended, once its receive loop has (1006: closed without a close frame)."""
        code = self.ws.close_code if self.ws.close_code is not None else 1006
        return Closed(code, self.ws.close_reason or "", time.monotonic() - self.opened, cause, self.silence)

    def forget(self) -> None:
        """Stop watching and subscribing (the socket is closed, or about to be)."""
        for task in (self.watchdog, self.subscriber):
            if task is not None:
                task.cancel()

    async def _receive(self, handler: ReceiveHandler) -> None:
        """The hot loop: frame, receive time, handler. Ends when the socket is closed."""
        recv = self.ws.recv
        clock = time.time_ns
        monotonic = time.monotonic
        observe = self.pace.observe
        batch = YIELD_EVERY_FRAMES
        try:
            frame = await recv(decode=False)
            handler(frame, clock() // 1000)
            observe(monotonic())
            self.first_frame.set()
            while True:
                frame = await recv(decode=False)
                handler(frame, clock() // 1000)
                observe(monotonic())
                batch -= 1
                if not batch:
                    # recv() does not suspend while frames are queued; let the sink flush meanwhile.
                    batch = YIELD_EVERY_FRAMES
                    await asyncio.sleep(0)
        except ConnectionClosed:
            return

    async def _watchdog(self) -> None:
        """Close a socket that stopped delivering data (silent stalls, binance.md §7 #5), and
        resubscribe a stream that stopped while the rest of the socket goes on."""
        while True:
            verdict = judge_connection(self._policy, self.pace, time.monotonic())
            if verdict.silent:
                # Logged once closed, in the connection's disconnect line with its reconnect.
                self._state.last_error = f"silent for {verdict.silent_s:.0f}s"
                self.silence = verdict
                await self.ws.close(1000, "silent")
                return
            await self._resubscribe_silent_stream()
            await asyncio.sleep(verdict.recheck_in_s)

    async def _resubscribe_silent_stream(self) -> None:
        """Resubscribe the first clock-driven stream quiet for 50 of its usual gaps, when the socket's
        message pace allows (the next look takes the next one)."""
        if not self.subscriptions.ready(time.monotonic()):
            return
        now_us = time.time_ns() // 1000
        state = self._state  # its streams: a stream removed with its symbol is not watched any more
        silent = silent_streams(self._policy, state.streams, state.stream_stats, now_us, self.opened_us)
        if not silent:
            return
        stream, stats = silent[0], state.stream_stats[silent[0]]
        last_us = stats.last_message_us or 0  # never None here: a stream never heard is not judged
        stats.silenced_at_us = now_us
        logger.warning(
            "ws.stream_silent id=%s stream=%s silent_s=%.1f usual_gap_s=%.3f action=resubscribe",
            state.id,
            stream,
            (now_us - last_us) / 1e6,
            stats.gap_us / 1e6,
        )
        if self._on_stream_silent is not None:
            self._on_stream_silent(stream, last_us)
        try:
            await self.subscriptions.resubscribe(stream)
        except ConnectionClosed:
            return

    async def _subscriber(self) -> None:
        """Keep what the socket is subscribed to equal to the connection's streams while it is open."""
        try:
            await self.subscriptions.follow(lambda: self._state.streams, self._state.id, self.source)
        except ConnectionClosed:
            return  # the next socket opens with the state's URL, which names the current streams
