"""SUBSCRIBE/UNSUBSCRIBE on an open socket: which messages, their JSON, and their pace.

The one place these messages are built (binance.md §1.3, same on spot and USD-M):
`{"method": "SUBSCRIBE", "params": ["btcusdt@aggTrade", ...], "id": 1}`, answered by
`{"result": null, "id": 1}`. The pure part plans the messages (`subscription_messages`,
`resubscribe_messages`) and writes them (`control_message`); `SocketSubscriptions` is the thin asyncio
shell that sends them over one socket at Binance's pace and remembers what the socket carries.
- Many names go in one message (up to 200 are accepted, binance.md §7 #3), because the per-connection
  budget (5 messages/s spot, 10/s USD-M, pings and pongs included, binance.md §2) counts messages,
  not names; at most one message per CONTROL_MESSAGE_INTERVAL_S keeps far below either.
- Unsubscriptions go first, so a socket never holds more streams than its cap, even for a moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Final, Literal

import orjson

logger = logging.getLogger(__name__)

Method = Literal["SUBSCRIBE", "UNSUBSCRIBE"]
Message = tuple[Method, tuple[str, ...]]

# Names per SUBSCRIBE/UNSUBSCRIBE: 200 were accepted on the live hosts (binance.md §7 #3); half that
# leaves room should Binance lower it, and a new listing adds a handful of streams anyway.
MAX_NAMES_PER_MESSAGE: Final = 100
# One message every 500 ms keeps far below 5 a second on spot and 10 on USD-M (binance.md §2).
CONTROL_MESSAGE_INTERVAL_S: Final = 0.5


def control_message(method: Method, names: Sequence[str], request_id: int) -> str:
    """The JSON text of one SUBSCRIBE/UNSUBSCRIBE (Binance echoes `request_id` in its answer)."""
    return orjson.dumps({"method": method, "params": list(names), "id": request_id}).decode()


def subscription_messages(
    subscribed: Collection[str], wanted: Sequence[str], max_names: int = MAX_NAMES_PER_MESSAGE
) -> list[Message]:
    """The messages that turn a socket subscribed to `subscribed` into one carrying `wanted`.

    Unsubscriptions go first, so the socket never holds more streams than its cap, even for a moment.
    """
    wanted_set = set(wanted)
    removed = sorted(name for name in subscribed if name not in wanted_set)
    added = [name for name in dict.fromkeys(wanted) if name not in subscribed]
    steps: tuple[tuple[Method, list[str]], ...] = (("UNSUBSCRIBE", removed), ("SUBSCRIBE", added))
    messages: list[Message] = []
    for method, names in steps:
        for index in range(0, len(names), max_names):
            messages.append((method, tuple(names[index : index + max_names])))
    return messages


def resubscribe_messages(stream: str) -> list[Message]:
    """The two messages that restart one stream that went silent on a socket that still delivers."""
    return [("UNSUBSCRIBE", (stream,)), ("SUBSCRIBE", (stream,))]


class SocketSubscriptions:
    """What one socket is subscribed to, and the paced sending of the messages that change it.

    `send` is the socket's send; the exceptions it raises (a closed socket) reach the caller.
    """

    __slots__ = ("_last_id", "_next_at", "_send", "changed", "subscribed")

    def __init__(self, send: Callable[[str], Awaitable[None]], streams: Collection[str]) -> None:
        self._send = send
        self.subscribed = set(streams)  # the socket's URL's streams, then what SUBSCRIBEs added
        self.changed = asyncio.Event()  # the wanted streams changed: bring `subscribed` in line
        self._next_at = 0.0  # monotonic time the next message may be sent
        self._last_id = 0

    def ready(self, now_s: float) -> bool:
        """Whether a message sent at `now_s` (monotonic) stays within the pace."""
        return now_s >= self._next_at

    async def follow(self, wanted: Callable[[], Sequence[str]], connection_id: str, source: str) -> None:
        """Keep `subscribed` equal to `wanted()`, again whenever `changed` is set; for ever (or until
        the socket closes). `connection_id` and `source` name the socket in the log."""
        while True:
            self.changed.clear()
            messages = subscription_messages(self.subscribed, wanted())
            for method, names in messages:
                await self.send(method, names)
                if method == "SUBSCRIBE":
                    self.subscribed.update(names)
                else:
                    self.subscribed.difference_update(names)
            if messages:
                logger.info(
                    "ws.subscriptions_synced id=%s source=%s messages=%d streams=%d",
                    connection_id,
                    source,
                    len(messages),
                    len(self.subscribed),
                )
            await self.changed.wait()

    async def send(self, method: Method, names: Sequence[str]) -> None:
        """Send one message once the pace allows it."""
        while (wait_s := self._next_at - time.monotonic()) > 0:
            await asyncio.sleep(wait_s)
        self._next_at = time.monotonic() + CONTROL_MESSAGE_INTERVAL_S  # before the send: no overlap
        await self._send_now(method, names)

    async def resubscribe(self, stream: str) -> None:
        """UNSUBSCRIBE then SUBSCRIBE `stream` now (call only when `ready`); `subscribed` is unchanged.

        Both slots are reserved before sending, so `follow` waits behind these two messages.
        """
        messages = resubscribe_messages(stream)
        self._next_at = time.monotonic() + len(messages) * CONTROL_MESSAGE_INTERVAL_S
        for method, names in messages:
            await self._send_now(method, names)

    async def _send_now(self, method: Method, names: Sequence[str]) -> None:
        self._last_id += 1
        await self._send(control_message(method, names, self._last_id))
