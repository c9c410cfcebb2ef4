"""One WebSocket connection to the fake exchange: SUBSCRIBE handling, the sender loop, pings, faults.

The sender writes data frames paced at the hub's rate (events per second on this connection, with
mark prices and liquidations on their own clocks) or, at rate 0, in bursts as fast as the socket
takes them. Frames are pre-serialised by the sources; the per-frame work is one envelope
concatenation, one frame header and one ledger entry, and a whole burst goes out in one socket write.
Binance's connection rules apply (binance.md §2): the incoming-message limit, the lifetime cut, and,
on demand, a silence (data produced but lost, pings still flowing) and a shutdown with notice.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import struct
import time
from collections.abc import Iterable
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

from collector.fake.faults import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    NOTICE_FAMILIES,
    IncomingWindow,
    Silence,
    max_incoming_per_s,
    shutdown_notice,
)
from collector.fake.generators import Event
from collector.fake.hub import Hub, Subscription, make_subscription, now_ms, release
from collector.fake.ledger import ConnectionCounts, ServerClose
from collector.fake.names import PathFamily, parse_stream

logger = logging.getLogger(__name__)

MAX_STREAMS_PER_CONNECTION = 1024  # Binance: the 1025th stream closes the connection (binance.md §2)
BURST_FRAMES = 128  # full-speed frames produced per turn before yielding to the event loop
MAX_BURST_S = 0.1  # paced mode never catches up more than this much time at once
MIN_SLEEP_S = 0.002
MAX_SLEEP_S = 0.05  # periodic streams (mark price, liquidations) are checked at least this often
# A silent connection at full speed has no reader to set its pace: one burst per 10 ms (~12,800
# events/s) keeps its market moving without spinning the core the test client shares.
SILENT_BURST_PERIOD_S = 0.01
CLOSE_WAIT_S = 2.0  # how long a server-started close may wait for the client's close frame
_SHORT_HEADERS = [bytes((0x81, n)) for n in range(126)]  # FIN + text opcode, 7-bit length


def text_frame_header(length: int) -> bytes:
    """Header of a final, unmasked text frame of `length` bytes (RFC 6455 §5.2)."""
    if length < 126:
        return _SHORT_HEADERS[length]
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)


class StreamSession:
    """A combined-stream connection: its subscriptions, its sender and its pinger."""

    def __init__(
        self,
        hub: Hub,
        request: web.Request,
        ws: web.WebSocketResponse,
        writer: AbstractStreamWriter,
        family: PathFamily,
        connection_id: int,
        ping_interval_s: float,
        pong_timeout_s: float,
    ) -> None:
        self.hub = hub
        self.request = request
        self.ws = ws
        self.writer = writer
        self.family = family
        self.connection_id = connection_id
        self.ping_interval_s = ping_interval_s
        self.pong_timeout_s = pong_timeout_s
        self._subs: dict[str, Subscription | None] = {}  # every subscribed name; None = silent
        self._rate_subs: list[Subscription] = []
        self._periodic_subs: list[Subscription] = []
        self._urgent: collections.deque[tuple[Subscription, Event]] = collections.deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._rr = 0
        self._tokens = 0.0
        self._last_tick = time.monotonic()
        self._last_pong = time.monotonic()
        self._incoming = IncomingWindow(max_incoming_per_s(family))
        self._silence: Silence | None = None
        self._silence_end: asyncio.TimerHandle | None = None
        self._closer: asyncio.Task[Any] | None = None  # the task that started a server-side close
        self._later: list[asyncio.Task[None]] = []  # scheduled closes (shutdown notices)
        self.counts = ConnectionCounts(connection_id, request.path, (), opened_ms=now_ms())

    # -- the Session protocol the hub uses --------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def sends_data(self) -> bool:
        """Whether this connection has rate-paced streams (it then takes a share of a total rate)."""
        return bool(self._rate_subs) and not self._closed

    def push_urgent(self, subscription: Subscription, event: Event) -> None:
        self._urgent.append((subscription, event))
        self._wake.set()

    def subscriptions(self) -> Iterable[Subscription]:
        return [sub for sub in self._subs.values() if sub is not None]

    def abort(self) -> None:
        """Drop the TCP connection with no close frame, as a network failure would."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def close(self, code: int, message: bytes) -> None:
        """Close with a close frame (server shutdown)."""
        await self._server_close(code, message.decode(), "stop")

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.connection_id,
            "path": self.request.path,
            "streams": list(self._subs),
            "silent": [name for name, sub in self._subs.items() if sub is None],
            "silenced": self._silence is not None,
            "opened_ms": self.counts.opened_ms,
        }

    def silence(self, seconds: float) -> None:
        """Send no data frames for `seconds` (extending a running silence); events produced are lost.

        The sender keeps taking events at its usual pace, so the market moves on and shared streams
        stay in step; each one taken is recorded in the silence instead of written. Pings, pongs and
        replies still go out: a stalled data path, not a dead socket.
        """
        loop = asyncio.get_running_loop()
        if self._silence is None:
            self._silence = silence = Silence(self.connection_id, self.request.path, now_ms())
            for sub in self.subscriptions():
                silence.stream(sub.name, sub.ref.kind, sub.ref.market, sub.ref.symbol)
            self.hub.ledger.silences.append(silence)
            logger.info("fake.silence id=%d seconds=%.3f", self.connection_id, seconds)
        until = loop.time() + seconds
        if self._silence_end is None or until > self._silence_end.when():
            if self._silence_end is not None:
                self._silence_end.cancel()
            self._silence_end = loop.call_at(until, self._end_silence)

    def _end_silence(self) -> None:
        silence = self._silence
        if silence is None:
            return
        silence.end_ms = now_ms()
        self._silence = None
        if self._silence_end is not None:
            self._silence_end.cancel()
            self._silence_end = None
        logger.info("fake.silence_end id=%d lost=%d", self.connection_id, silence.count)
        self._wake.set()

    def shut_down(self, notice_s: float) -> bool:
        """Announce a server restart now (spot only), keep sending, close with 1001 after `notice_s`.

        Returns whether a notice frame was sent. USD-M documents no notice (binance.md §8): its
        connections are closed at the same moment without one.
        """
        notified = False
        transport = self.request.transport
        if self.family in NOTICE_FAMILIES and transport is not None and not self._closing():
            event_time = now_ms()
            frame = shutdown_notice(event_time)
            # Written like the data frames, in order with them; a silence does not hold it back.
            transport.write(text_frame_header(len(frame)) + frame)
            self.counts.control_frames += 1
            self.counts.shutdown_notice_ms = event_time
            notified = True
        logger.info(
            "fake.shutdown_notice id=%d notice_s=%.3f notified=%s", self.connection_id, notice_s, notified
        )
        self._later.append(asyncio.create_task(self._close_after(notice_s, CLOSE_GOING_AWAY, "shutdown")))
        return notified

    # -- life cycle ------------------------------------------------------------------------------

    async def serve(self, streams: list[str]) -> None:
        """Run until the client or the server closes the connection."""
        hub = self.hub
        hub.sessions[self.connection_id] = self
        hub.ledger.connections[self.connection_id] = self.counts
        logger.info(
            "fake.connect id=%d path=%s streams=%d", self.connection_id, self.request.path, len(streams)
        )
        tasks: list[asyncio.Task[None]] = []
        try:
            if not await self._subscribe(streams, request_id=None):
                return
            tasks = [
                asyncio.create_task(self._send_loop()),
                asyncio.create_task(self._ping_loop()),
                asyncio.create_task(self._close_after(hub.max_connection_age_s, CLOSE_GOING_AWAY, "max_age")),
            ]
            await self._read_loop()
        finally:
            self._closed = True
            self._end_silence()
            closer = self._closer
            if closer is not None and closer is not asyncio.current_task() and not closer.done():
                # Let it read the client's close frame, so the client is not left waiting for TCP close.
                await asyncio.wait([closer], timeout=CLOSE_WAIT_S)
            tasks += self._later
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            hub.sessions.pop(self.connection_id, None)
            self._unsubscribe(list(self._subs))
            self.counts.open = False
            logger.info("fake.disconnect id=%d frames=%d", self.connection_id, self.counts.data_frames)

    async def _read_loop(self) -> None:
        try:
            async for message in self.ws:  # ends on the client's close frame (answered by aiohttp)
                if message.type == WSMsgType.TEXT:
                    if self._too_many_incoming():
                        await self._server_close(CLOSE_POLICY_VIOLATION, "Too many requests", "rate_limit")
                        return
                    await self._control(message.data)
                elif message.type == WSMsgType.PING:
                    # Spot counts PING frames too (binance.md §2); pongs are not counted: a client
                    # answering a fake with a short test ping interval would trip the limit.
                    if self.family == "spot" and self._too_many_incoming():
                        await self._server_close(CLOSE_POLICY_VIOLATION, "Too many requests", "rate_limit")
                        return
                    await self.ws.pong(message.data)
                elif message.type == WSMsgType.PONG:
                    self._last_pong = time.monotonic()
                elif message.type == WSMsgType.ERROR:
                    break
        except ConnectionError:
            return  # the client went away while we answered it

    def _too_many_incoming(self) -> bool:
        """Count one client message; True past Binance's per-second limit (then close, binance.md §2)."""
        self.counts.incoming_messages += 1
        if not self._incoming.count(time.monotonic()):
            return False
        logger.warning("fake.too_many_requests id=%d limit=%d/s", self.connection_id, self._incoming.limit)
        return True

    async def _close_after(self, delay_s: float, code: int, cause: str) -> None:
        await asyncio.sleep(delay_s)
        await self._server_close(code, "", cause)

    async def _server_close(self, code: int, reason: str, cause: str) -> None:
        """Send a close frame and wait for the client's; recorded in the ledger once."""
        if self.ws.closed:
            return
        self._closer = asyncio.current_task()
        self.counts.server_close = ServerClose(code, reason, cause, now_ms())
        logger.info("fake.server_close id=%d code=%d cause=%s", self.connection_id, code, cause)
        try:
            await self.ws.close(code=code, message=reason.encode())
        except ConnectionError:
            return

    def _closing(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing() or self.ws.closed

    async def _reply(self, body: dict[str, Any]) -> None:
        self.counts.control_frames += 1
        await self.ws.send_str(json.dumps(body, separators=(",", ":")))

    async def _control(self, text: str) -> None:
        """Answer a JSON request the way Binance does (binance.md §1.3)."""
        try:
            request = json.loads(text)
        except ValueError as error:
            await self._reply({"code": 3, "msg": f"Invalid JSON: {error}"})
            return
        if not isinstance(request, dict):
            await self._reply({"code": 2, "msg": "Invalid request: request must be an object"})
            return
        method, params, request_id = request.get("method"), request.get("params"), request.get("id")
        names = [p for p in params if isinstance(p, str)] if isinstance(params, list) else []
        if method == "SUBSCRIBE":
            if await self._subscribe(names, request_id):
                await self._reply({"result": None, "id": request_id})
        elif method == "UNSUBSCRIBE":
            self._unsubscribe(names)
            await self._reply({"result": None, "id": request_id})
        elif method == "LIST_SUBSCRIPTIONS":
            await self._reply({"result": list(self._subs), "id": request_id})
        elif method == "SET_PROPERTY":
            await self._reply({"result": None, "id": request_id})
        elif method == "GET_PROPERTY":
            await self._reply({"result": True, "id": request_id})
        else:
            await self._reply(
                {"code": 2, "msg": f"Invalid request: unknown method {method!r}", "id": request_id}
            )

    async def _subscribe(self, names: list[str], request_id: object) -> bool:
        """Add streams; a name Binance would not serve is kept (and listed) but never sends."""
        hub = self.hub
        new = [name for name in dict.fromkeys(names) if name and name not in self._subs]
        if len(self._subs) + len(new) > MAX_STREAMS_PER_CONNECTION:
            if request_id is not None:
                await self._reply({"error": {"code": 4, "msg": "Too many subscriptions"}, "id": request_id})
            await self._server_close(CLOSE_POLICY_VIOLATION, "Invalid request", "too_many_streams")
            return False
        for name in new:
            ref = parse_stream(self.family, name, hub.listed["spot"], hub.listed["futures"])
            if ref is None:
                logger.info(
                    "fake.silent_stream id=%d path=%s name=%s", self.connection_id, self.request.path, name
                )
                self._subs[name] = None
            else:
                self._subs[name] = make_subscription(name, ref, hub.source(ref))
        self._regroup()
        return True

    def refresh_symbols(self) -> None:
        """Judge every subscribed name again after a listing change: a delisted symbol's streams fall
        silent (they stay subscribed, as on Binance), a newly listed symbol's start sending."""
        hub = self.hub
        changed = False
        for name, sub in list(self._subs.items()):
            ref = parse_stream(self.family, name, hub.listed["spot"], hub.listed["futures"])
            if sub is None and ref is not None:
                self._subs[name] = make_subscription(name, ref, hub.source(ref))
                changed = True
            elif sub is not None and ref is None:
                release(sub)
                self._subs[name] = None
                changed = True
        if changed:
            self._regroup()

    def _unsubscribe(self, names: list[str]) -> None:
        for name in names:
            sub = self._subs.pop(name, None)
            if sub is not None:
                release(sub)
        self._regroup()

    def _regroup(self) -> None:
        live = self.subscriptions()
        self._rate_subs = [sub for sub in live if not sub.source.periodic]
        self._periodic_subs = [sub for sub in live if sub.source.periodic]
        self.counts.streams = tuple(self._subs)
        self._wake.set()

    # -- sending ---------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        hub = self.hub
        try:
            while not self._closed:
                if self._closing():
                    return  # check before producing: an event taken now could be written nowhere
                if self._urgent:
                    await self._write(self._drain_urgent(), reserved=False)
                    continue
                idle = not (self._rate_subs or self._periodic_subs)
                exhausted = hub.remaining is not None and hub.remaining <= 0
                if hub.paused or idle or exhausted:
                    await self._sleep(None)
                elif (rate := hub.connection_rate()) <= 0:
                    await self._write(self._burst(), reserved=True)
                    # Let the loop serve REST, control and other connections.
                    await asyncio.sleep(0 if self._silence is None else SILENT_BURST_PERIOD_S)
                else:
                    frames, delay = self._paced_step(rate)
                    await self._write(frames, reserved=True)
                    await self._sleep(delay)
        except ConnectionError:
            logger.debug("fake.send_stopped id=%d", self.connection_id)

    async def _sleep(self, timeout: float | None) -> None:
        """Sleep until woken (subscribe, resume, rate change, injection) or `timeout` seconds."""
        if not self._wake.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
        self._wake.clear()

    def _drain_urgent(self) -> list[tuple[Subscription, Event]]:
        frames = list(self._urgent)
        self._urgent.clear()
        return frames

    def _burst(self) -> list[tuple[Subscription, Event]]:
        """Up to BURST_FRAMES events, round robin over every live stream, none withheld."""
        subs = self._rate_subs + self._periodic_subs
        granted = self.hub.reserve(BURST_FRAMES)
        frames: list[tuple[Subscription, Event]] = []
        now, count, index, misses = now_ms(), len(subs), self._rr, 0
        while len(frames) < granted and misses < count:
            sub = subs[index % count]
            index += 1
            event, sub.cursor = sub.source.take(sub.cursor, now, False)
            if event is None:
                misses += 1
                continue
            misses = 0
            frames.append((sub, event))
        self._rr = index % count
        self.hub.refund(granted - len(frames))
        return frames

    def _paced_step(self, rate: float) -> tuple[list[tuple[Subscription, Event]], float]:
        """The frames due now at `rate` events/s, and how long to sleep before the next step."""
        hub = self.hub
        tick = time.monotonic()
        self._tokens = min(self._tokens + (tick - self._last_tick) * rate, max(1.0, rate * MAX_BURST_S))
        self._last_tick = tick
        now = now_ms()
        frames: list[tuple[Subscription, Event]] = []
        for sub in self._periodic_subs:
            while hub.reserve(1):
                event, sub.cursor = sub.source.take(sub.cursor, now, True)
                if event is None:
                    hub.refund(1)
                    break
                frames.append((sub, event))
        subs = self._rate_subs
        if not subs:
            self._tokens = 0.0
            return frames, MAX_SLEEP_S
        granted = hub.reserve(int(self._tokens))
        for _ in range(granted):
            sub = subs[self._rr % len(subs)]
            self._rr += 1
            event, sub.cursor = sub.source.take(sub.cursor, now, True)
            if event is not None:
                frames.append((sub, event))
                self._tokens -= 1.0
            else:
                hub.refund(1)
        delay = (1.0 - (self._tokens % 1.0)) / rate
        return frames, min(max(delay, MIN_SLEEP_S), MAX_SLEEP_S)

    async def _write(self, frames: list[tuple[Subscription, Event]], reserved: bool) -> None:
        """Write data frames in order with one socket write; each is recorded once written.

        One `transport.write` for the whole burst instead of one per frame: a per-frame write is a
        `send` syscall each while the client keeps up, which halves the frame rate. Frames are
        unmasked, uncompressed text frames (RFC 6455 §5.2), the same bytes aiohttp would write.
        """
        hub, ledger, counts = self.hub, self.hub.ledger, self.counts
        transport = self.request.transport
        if transport is None or transport.is_closing() or self.ws.closed:
            if reserved:
                hub.refund(len(frames))
            self._closed = True
            raise ConnectionResetError("connection closed")
        if not frames:
            return
        if self._silence is not None:
            self._lose(self._silence, frames, reserved)
            return
        parts: list[bytes] = []
        for sub, event in frames:
            frame = sub.envelope(event)
            if hub.malformed_pending > 0 and hub.take_malformed():
                # A truncated copy: not valid JSON, still valid UTF-8 (all frames are ASCII).
                broken = frame[: len(frame) // 2]
                parts += (text_frame_header(len(broken)), broken)
                ledger.malformed_sent += 1
                counts.malformed += 1
            parts += (text_frame_header(len(frame)), frame)
        transport.write(b"".join(parts))
        for _, event in frames:
            ledger.record(event)
        counts.data_frames += len(frames)
        await self.writer.drain()  # waits only while the socket's buffer is above its high mark

    def _lose(self, silence: Silence, frames: list[tuple[Subscription, Event]], reserved: bool) -> None:
        """Record frames a silent connection does not send; they do not count against max_events."""
        for sub, event in frames:
            ref = sub.ref
            silence.stream(sub.name, ref.kind, ref.market, ref.symbol).add(event)
        self.counts.not_delivered += len(frames)
        if reserved:
            self.hub.refund(len(frames))

    async def _ping_loop(self) -> None:
        """Ping every interval (payload: a ms timestamp, as fstream does); close on a missing pong."""
        try:
            while not self._closed:
                await asyncio.sleep(self.ping_interval_s)
                if time.monotonic() - self._last_pong > self.pong_timeout_s:
                    logger.warning("fake.pong_timeout id=%d", self.connection_id)
                    await self._server_close(CLOSE_POLICY_VIOLATION, "Pong timeout", "pong_timeout")
                    return
                await self.ws.ping(str(now_ms()).encode())
        except ConnectionError:
            return
