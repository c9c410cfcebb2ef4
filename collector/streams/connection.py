"""One stream connection held for ever across sockets: connect, replace, reconnect, stop.

What one open socket does (receive, watch for silence, follow the subscriptions) is
`collector.streams.live`'s; what a frame means is the handler's. Guarantees:
- `stop()` closes gracefully and keeps reading until the server's close frame, so every frame the
  server sent before it is still handed to the handler.
- Make-before-break: before Binance's 24-hour cut (WS_ROTATE_AFTER_S) and on a `serverShutdown`
  notice, a replacement is opened and receiving before the old socket is closed, so nothing falls
  between them; the overlap's repeats are absorbed downstream (unique keys, depth tracker).
- A socket closed by the server, the network or the silence watchdog is reopened with jittered
  backoff (`collector.streams.backoff`), afresh after a socket that worked; handshakes keep to
  Binance's connection attempts per 5 minutes (`collector.streams.limits`).
- The streams can change while the connection is open (`change_streams`): the open socket follows
  with SUBSCRIBE/UNSUBSCRIBE, and every later socket opens with the new list.
- One log line per connect (`ws.connected`), and one per disconnect or failed connect
  (`ws.disconnected`, `ws.connect_failed`) that, when a reconnect follows, carries its `attempt`
  (1 after a socket that worked, counting up while they fail) and its `delay_s`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Final, Protocol

from websockets.exceptions import WebSocketException

from collector.settings import Settings
from collector.streams.backoff import Reconnects
from collector.streams.limits import ATTEMPTS_PER_WINDOW, ATTEMPTS_WINDOW_S, ConnectionAttempts
from collector.streams.live import Closed, LiveSocket, ReceiveHandler, open_socket
from collector.streams.silence import SilencePolicy, restart_watch
from collector.streams.state import ConnectionState

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S: Final = 5.0
# A connection that stayed up this long counts as healthy: the next failure starts the backoff
# again from WS_BACKOFF_INITIAL_S. A server that accepts and drops at once keeps backing off, which
# also keeps us under Binance's 300 connection attempts per 5 minutes per IP (binance.md §2).
STABLE_AFTER_S: Final = 30.0
# After a replacement opened, wait at most this long for its first frame before closing the old one:
# a connection of quiet streams may legitimately say nothing for a while.
REPLACEMENT_FIRST_FRAME_S: Final = 10.0
# A replacement that could not be opened is tried again this often while the old one still lives.
REPLACEMENT_RETRY_S: Final = 5.0


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

    @property
    def silence(self) -> SilencePolicy:
        return SilencePolicy(self.silence_min_s, self.idle_timeout_s)


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
        self._lives: set[LiveSocket] = set()
        self._silence = options.silence
        self._generation = 0
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._notice = asyncio.Event()  # the server announced its shutdown: replace the connection
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"ws-{self.state.id}")
        return self._task

    async def stop(self) -> None:
        """Close gracefully, handing over every frame received before the close; idempotent."""
        self._stopping = True
        self._stop_event.set()
        for live in list(self._lives):
            await live.ws.close(1000, "client stopping")
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
        restart_watch(self.state, streams)
        self.state.streams, self.state.url = streams, url
        for live in self._lives:
            live.subscriptions.changed.set()

    def request_handover(self) -> None:
        """The server announced its shutdown: open a replacement now, then close this connection."""
        self._notice.set()

    async def run(self) -> None:
        """Connect, receive, replace before the server's cut, reconnect with backoff until `stop()`."""
        options = self._options
        reconnects = Reconnects(options.backoff_initial_s, options.backoff_max_s, self._rng)
        live: LiveSocket | None = None
        while not self._stopping:
            if live is None:
                self.state.state = "connecting"
                opened = await self._connect()
                if isinstance(opened, LiveSocket):
                    live = opened
                elif opened is not None and not self._stopping:
                    attempt, delay = reconnects.next()
                    logger.warning(
                        "ws.connect_failed id=%s url=%s error=%s attempt=%d delay_s=%.2f",
                        self.state.id,
                        self.state.url,
                        opened,
                        attempt,
                        delay,
                    )
                    await self._pause(delay)
                continue
            received_before = self.state.messages
            ended = await self._hold(live)
            if isinstance(ended, LiveSocket):
                live = ended  # replaced make-before-break: no gap, no backoff
                continue
            live = None
            if self._stopping:
                self._log_closed(ended)
                continue
            # A connection that delivered data worked: the next failure starts the backoff afresh,
            # so a server that drops connections every few seconds does not push the delay up.
            delivered = self.state.messages > received_before
            noticed = self._notice.is_set()
            if noticed or delivered or ended.up_s >= options.stable_after_s:
                reconnects.reset()
            self._notice.clear()
            attempt, delay = reconnects.next(immediate=noticed)
            self._log_closed(ended, attempt, delay)
            await self._pause(delay)
        self.state.state = "stopped"

    def _log_closed(self, ended: Closed, attempt: int = 0, delay_s: float = 0.0) -> None:
        """The connection's one disconnect line; with the reconnect that follows, if one does."""
        silence = f" {ended.silence.describe()}" if ended.silence is not None else ""
        retry = f" attempt={attempt} delay_s={delay_s:.2f}" if attempt else ""
        logger.log(
            logging.WARNING if ended.silence is not None else logging.INFO,
            "ws.disconnected id=%s cause=%s code=%s reason=%s after_s=%.1f%s%s",
            self.state.id,
            ended.cause,
            ended.code,
            ended.reason or "-",
            ended.up_s,
            silence,
            retry,
        )

    async def _pause(self, delay: float) -> None:
        self.state.state = "backoff"
        self.state.reconnects += 1
        await self._sleep(delay)

    async def _sleep(self, seconds: float) -> bool:
        """Wait `seconds`, or less if `stop()` comes first (-> True)."""
        try:
            await asyncio.wait_for(self._stop_event.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _connect(self) -> LiveSocket | str | None:
        """Open one physical connection and start receiving on it: the live connection, the error that
        kept it from opening, or None when `stop()` came first."""
        state = self.state
        if not await self._wait_attempt_slot():
            return None
        streams = state.streams  # the ones the URL names, read together with it below
        options = self._options
        opening = asyncio.create_task(open_socket(state.url, options.open_timeout_s, options.close_timeout_s))
        stopping = asyncio.create_task(self._stop_event.wait())
        await asyncio.wait([opening, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not opening.done():  # stop() during the handshake: nothing was received yet
            opening.cancel()
            return None
        try:
            ws = opening.result()
        except (OSError, TimeoutError, WebSocketException) as error:
            failure = f"{type(error).__name__}: {error}"
            state.last_error = f"connect: {failure}"
            return failure
        self._generation += 1
        source = f"{state.id}#{self._generation}"
        on_silent = partial(self._events.stream_silent, state) if self._events is not None else None
        live = LiveSocket(ws, source, streams, state, self._silence, on_silent)
        self._lives.add(live)
        if self._events is not None:
            self._events.source_opened(live.source)
        live.start(self._handler_for(source, self.request_handover))
        state.state = "connected"
        state.connected_since_us = time.time_ns() // 1000
        logger.info("ws.connected id=%s url=%s streams=%d", state.id, state.url, len(state.streams))
        if self._stopping:  # stop() ran during the handshake
            await ws.close(1000, "client stopping")
        if self._events is not None:
            self._events.connection_opened(state)
        return live

    async def _hold(self, live: LiveSocket) -> Closed | LiveSocket:
        """Until `live` closes (-> how) or is replaced make-before-break (-> the replacement)."""
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
                return self._closed(live)
            if self._stopping:
                continue  # stop() closes every socket: the receive loop ends by itself
            reason = "server shutdown notice" if self._notice.is_set() else "age"
            self._notice.clear()
            replacement = await self._connect()
            if not isinstance(replacement, LiveSocket):
                if replacement is not None:  # the old connection still delivers: no outage yet
                    logger.warning(
                        "ws.replacement_failed id=%s url=%s error=%s retry_in_s=%.1f",
                        self.state.id,
                        self.state.url,
                        replacement,
                        REPLACEMENT_RETRY_S,
                    )
                rotate_at = time.monotonic() + REPLACEMENT_RETRY_S
                continue
            if live.receiving.done() and self._events is not None:
                # The old one ended while the replacement was opening: the streams had a short hole.
                self._events.connection_lost(self.state, self._loss_cause(live))
                self._events.connection_opened(self.state)
            await self._replace(live, replacement, reason)
            return replacement

    async def _replace(self, old: LiveSocket, new: LiveSocket, reason: str) -> None:
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

    def _closed(self, live: LiveSocket) -> Closed:
        """Bookkeeping for a connection that ended by itself (server, network, silence or stop())."""
        self._forget(live)
        ended = live.ended(self._loss_cause(live))
        if self._events is not None and not self._lives:
            self._events.connection_lost(self.state, ended.cause)
        if not self._stopping:
            self.state.last_error = f"closed: code={ended.code} reason={ended.reason}"
        return ended

    def _forget(self, live: LiveSocket) -> None:
        live.forget()
        self._lives.discard(live)
        if self._events is not None:
            self._events.source_closed(live.source)

    def _loss_cause(self, live: LiveSocket) -> str:
        if self._stopping:
            return "shutdown"
        if self._notice.is_set():
            return "server_shutdown"
        return "silence" if live.silence is not None else "disconnect"

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
        return not await self._sleep(wait_s)
