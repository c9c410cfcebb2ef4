"""The fake Binance exchange: WebSocket + REST + control on one aiohttp port, in-process or as a CLI.

Base URLs a client is given: spot WS `ws://H:P/spot`, futures WS `ws://H:P/futures`, spot REST
`http://H:P/spot`, futures REST `http://H:P/futures`; the client appends Binance's own paths
(`/stream?streams=`, `/public/stream?streams=`, `/api/v3/depth`, `/fapi/v1/depth`, ...).
`FakeExchange` runs it on a background thread for tests and benchmarks; `main` runs it in the
foreground until SIGTERM/SIGINT (`collector fake-exchange ...`, `python -m collector.fake`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from collector.fake.connection import StreamSession
from collector.fake.control import Controls
from collector.fake.faults import MAX_CONNECTION_AGE_S
from collector.fake.generators import synthetic_symbols
from collector.fake.hub import Hub
from collector.fake.names import path_family
from collector.fake.recordings import Recordings, load_recordings
from collector.fake.rest import RestApi
from collector.fake.tls import FakeTls, make_tls

logger = logging.getLogger(__name__)

# Binance pings spot connections every 20 s (pong within 1 min) and USD-M every 3 min (pong within
# 10 min) (binance.md §2).
SPOT_PING_INTERVAL_S = 20.0
SPOT_PONG_TIMEOUT_S = 60.0
FUTURES_PING_INTERVAL_S = 180.0
FUTURES_PONG_TIMEOUT_S = 600.0
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 2.0
CLOSE_GOING_AWAY = 1001
WS_PATHS = ("/spot/stream", "/futures/public/stream", "/futures/market/stream", "/futures/stream")
DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT")
# 1024 stream names in one `?streams=` URL (binance.md §2) need ~40 KB; aiohttp's default is 8190.
MAX_REQUEST_LINE_BYTES = 64 * 1024

T = TypeVar("T")


@dataclass(frozen=True)
class FakeConfig:
    """Everything a fake exchange is started with."""

    host: str = "127.0.0.1"
    port: int = 0
    rate: float = 100.0
    spot_symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    futures_symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    seed: int = 1
    max_events: int | None = None
    recordings: Path | Recordings | None = None
    ping_interval_s: float | None = None
    max_connection_age_s: float = MAX_CONNECTION_AGE_S
    tls: bool = False  # serve wss:// and https:// with a certificate made at start (collector.fake.tls)
    tls_dir: Path | None = None  # where the CA file goes; a new temporary folder when None
    rate_is_total: bool = False  # `rate` is of all connections together (--total-rate)


def base_urls(host: str, port: int, tls: bool = False) -> dict[str, str]:
    """The base URLs a collector is configured with for a fake on host:port."""
    host = "127.0.0.1" if host in ("", "0.0.0.0") else host
    ws, http = ("wss", "https") if tls else ("ws", "http")
    return {
        "spot_ws": f"{ws}://{host}:{port}/spot",
        "futures_ws": f"{ws}://{host}:{port}/futures",
        "spot_rest": f"{http}://{host}:{port}/spot",
        "futures_rest": f"{http}://{host}:{port}/futures",
        "control": f"{http}://{host}:{port}/_fake",
    }


class FakeServer:
    """The aiohttp application on the caller's event loop."""

    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        recordings = config.recordings
        if not isinstance(recordings, Recordings):
            recordings = load_recordings(recordings)
        self.hub = Hub(
            rate=config.rate,
            spot_symbols=config.spot_symbols,
            futures_symbols=config.futures_symbols,
            seed=config.seed,
            max_events=config.max_events,
            recordings=recordings,
            max_connection_age_s=config.max_connection_age_s,
        )
        self.hub.rate_is_total = config.rate_is_total
        self.rest = RestApi(self.hub)
        self.controls = Controls(self.hub, self.rest)
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.tls: FakeTls | None = make_tls([config.host], config.tls_dir) if config.tls else None

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get(path, self._websocket) for path in WS_PATHS])
        app.add_routes(self.rest.routes())
        app.add_routes(self.controls.routes())
        return app

    async def start(self) -> int:
        """Listen; returns the bound port."""
        self._runner = web.AppRunner(
            self.app(), handle_signals=False, access_log=None, max_line_size=MAX_REQUEST_LINE_BYTES
        )
        await self._runner.setup()
        context = self.tls.context if self.tls is not None else None
        site = web.TCPSite(
            self._runner, self.config.host, self.config.port, reuse_address=True, ssl_context=context
        )
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        ca_file = self.tls.ca_file if self.tls is not None else "-"
        logger.info("fake.listening host=%s port=%d tls_ca_file=%s", self.config.host, self.port, ca_file)
        return self.port

    async def stop(self) -> None:
        """Close every WebSocket (1001 going away), then the listener."""
        sessions = list(self.hub.sessions.values())
        closes = [session.close(CLOSE_GOING_AWAY, b"Server shutdown") for session in sessions]
        if closes:
            await asyncio.wait([asyncio.ensure_future(c) for c in closes], timeout=CLOSE_TIMEOUT_S)
        for session in list(self.hub.sessions.values()):
            session.abort()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.tls is not None and self.config.tls_dir is None:
            shutil.rmtree(self.tls.ca_file.parent, ignore_errors=True)  # the temporary folder it made
        logger.info("fake.stopped port=%d", self.port)

    def _ping_plan(self, family: str) -> tuple[float, float]:
        if self.config.ping_interval_s is not None:
            return self.config.ping_interval_s, 3.0 * self.config.ping_interval_s
        if family == "spot":
            return SPOT_PING_INTERVAL_S, SPOT_PONG_TIMEOUT_S
        return FUTURES_PING_INTERVAL_S, FUTURES_PONG_TIMEOUT_S

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        family = path_family(request.path)
        if family is None:
            raise web.HTTPNotFound()
        streams = [name for name in request.query.get("streams", "").split("/") if name]
        ws: web.WebSocketResponse = web.WebSocketResponse(
            autoping=False, compress=False, max_msg_size=1 << 20
        )
        writer = await ws.prepare(request)
        ping_interval_s, pong_timeout_s = self._ping_plan(family)
        session = StreamSession(
            self.hub, request, ws, writer, family, next(self._ids), ping_interval_s, pong_timeout_s
        )
        await session.serve(streams)
        return ws


class FakeExchange:
    """A fake exchange on a background thread with its own event loop (for tests and benchmarks).

    >>> with FakeExchange(rate=0, max_events=1000) as fake:
    ...     connect(fake.spot_ws_url + "/stream?streams=btcusdt@aggTrade")
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        rate: float = 100.0,
        spot_symbols: Sequence[str] = DEFAULT_SYMBOLS,
        futures_symbols: Sequence[str] = DEFAULT_SYMBOLS,
        seed: int = 1,
        max_events: int | None = None,
        recordings: Path | Recordings | None = None,
        ping_interval_s: float | None = None,
        max_connection_age_s: float = MAX_CONNECTION_AGE_S,
        tls: bool = False,
        tls_dir: Path | None = None,
    ) -> None:
        self.config = FakeConfig(
            host,
            port,
            rate,
            tuple(spot_symbols),
            tuple(futures_symbols),
            seed,
            max_events,
            recordings,
            ping_interval_s,
            max_connection_age_s,
            tls,
            tls_dir,
        )
        self._server: FakeServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> FakeExchange:
        """Start listening; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("fake exchange already started")
        self._thread = threading.Thread(target=self._thread_main, name="fake-exchange", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("fake exchange did not start in time")
        if self._error is not None:
            raise RuntimeError(f"fake exchange failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        """Close every connection and the listener; idempotent."""
        loop, thread, stopping = self._loop, self._thread, self._stopping
        if loop is None or thread is None or stopping is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(stopping.set)
        thread.join(START_TIMEOUT_S)

    def __enter__(self) -> FakeExchange:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        try:
            self._server = FakeServer(self.config)
            await self._server.start()
        except Exception as error:  # reported to start() on the caller's thread
            self._error = error
            self._ready.set()
            return
        self._stopping = asyncio.Event()
        self._ready.set()
        await self._stopping.wait()
        await self._server.stop()

    def _call(self, action: Callable[[Controls], T]) -> T:
        """Run a control action on the server's loop and return its result."""
        if self._loop is None or self._server is None:
            raise RuntimeError("fake exchange not started")
        controls = self._server.controls

        async def run() -> T:
            return action(controls)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(CALL_TIMEOUT_S)

    # -- addresses -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("fake exchange not started")
        return self._server.port

    @property
    def urls(self) -> dict[str, str]:
        return base_urls(self.config.host, self.port, self.config.tls)

    @property
    def tls(self) -> FakeTls:
        """The TLS of a fake started with `tls=True` (its CA file and `client_env()`)."""
        if self._server is None or self._server.tls is None:
            raise RuntimeError("fake exchange not started with tls=True")
        return self._server.tls

    @property
    def spot_ws_url(self) -> str:
        return self.urls["spot_ws"]

    @property
    def futures_ws_url(self) -> str:
        return self.urls["futures_ws"]

    @property
    def spot_rest_url(self) -> str:
        return self.urls["spot_rest"]

    @property
    def futures_rest_url(self) -> str:
        return self.urls["futures_rest"]

    @property
    def control_url(self) -> str:
        return self.urls["control"]

    # -- control (same operations as /_fake/...) -----------------------------------------------------

    def ledger(self) -> dict[str, Any]:
        return self._call(lambda c: c.ledger())

    def connections(self) -> list[dict[str, Any]]:
        return self._call(lambda c: c.connections())

    def drop_connections(self) -> int:
        return self._call(lambda c: c.drop())

    def send_malformed(self, n: int) -> None:
        self._call(lambda c: c.malformed(n))

    def fail_rest(self, status: int = 429, count: int = 1, retry_after_s: float = 1.0) -> None:
        self._call(lambda c: c.rest_fail(status, count, retry_after_s))

    def liquidation(
        self, symbol: str, side: str, price: str | float, quantity: str | float
    ) -> dict[str, Any]:
        return self._call(lambda c: c.liquidation(symbol, side, str(price), str(quantity)))

    def pause(self) -> None:
        self._call(lambda c: c.pause())

    def resume(self) -> None:
        self._call(lambda c: c.resume())

    def set_rate(self, rate: float, total: bool | None = None) -> None:
        self._call(lambda c: c.set_rate(rate, total))

    def withhold_depth(self, market: str, symbol: str, count: int) -> None:
        self._call(lambda c: c.withhold_depth(market, symbol, count))

    def silence(self, seconds: float, market: str | None = None) -> list[int]:
        return self._call(lambda c: c.silence(seconds, market))

    def server_shutdown(self, notice_s: float, market: str | None = None) -> dict[str, list[int]]:
        return self._call(lambda c: c.server_shutdown(notice_s, market))

    def list_symbol(self, market: str, symbol: str) -> bool:
        return self._call(lambda c: c.list_symbol(market, symbol))

    def delist_symbol(self, market: str, symbol: str) -> bool:
        return self._call(lambda c: c.delist_symbol(market, symbol))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collector fake-exchange", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument(
        "--rate", type=float, default=100.0, help="data events/s per connection; 0 = full speed"
    )
    parser.add_argument(
        "--total-rate",
        type=float,
        default=None,
        help="data events/s of all connections together, shared evenly by those sending (overrides --rate)",
    )
    parser.add_argument("--max-events", type=int, default=None, help="stop sending data after N frames")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--spot-symbols", default=",".join(DEFAULT_SYMBOLS), help="comma separated")
    parser.add_argument("--futures-symbols", default=",".join(DEFAULT_SYMBOLS), help="comma separated")
    parser.add_argument(
        "--spot-symbol-count",
        type=int,
        default=0,
        help="also list N made-up spot symbols (ZAAAUSDT, ZAABFDUSD, ...), e.g. 1500",
    )
    parser.add_argument(
        "--futures-symbol-count",
        type=int,
        default=0,
        help="also list N made-up USD-M symbols (ZAAAUSDT, ZAABUSDC, ...), e.g. 500",
    )
    parser.add_argument(
        "--ping-interval-s", type=float, default=None, help="default: Binance's (20 s / 180 s)"
    )
    parser.add_argument("--recordings", type=Path, default=None, help="folder of cryptofeed recordings")
    parser.add_argument(
        "--max-connection-age-s",
        type=float,
        default=MAX_CONNECTION_AGE_S,
        help="close each WebSocket (1001) after this long; default Binance's 24 h",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve wss:// and https:// with a CA and certificate made at start (the CA file is printed)",
    )
    parser.add_argument(
        "--tls-dir", type=Path, default=None, help="where to write the CA file (default: a temp dir)"
    )
    return parser


def _symbols(text: str) -> tuple[str, ...]:
    return tuple(s.strip().upper() for s in text.split(",") if s.strip())


async def _run_foreground(config: FakeConfig) -> None:
    server = FakeServer(config)
    port = await server.start()
    urls = base_urls(config.host, port, config.tls)
    print("fake-exchange listening " + " ".join(f"{k}={v}" for k, v in urls.items()), flush=True)
    if server.tls is not None:
        trust = " ".join(f"{name}={value}" for name, value in server.tls.client_env().items())
        print(
            f"fake-exchange tls ca_file={server.tls.ca_file} (a collector trusts it with: {trust})",
            flush=True,
        )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake exchange in the foreground until SIGTERM/SIGINT; prints its base URLs."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = FakeConfig(
        host=args.host,
        port=args.port,
        rate=args.rate if args.total_rate is None else args.total_rate,
        spot_symbols=_symbols(args.spot_symbols) + synthetic_symbols("spot", args.spot_symbol_count),
        futures_symbols=_symbols(args.futures_symbols)
        + synthetic_symbols("futures", args.futures_symbol_count),
        seed=args.seed,
        max_events=args.max_events,
        recordings=args.recordings,
        ping_interval_s=args.ping_interval_s,
        max_connection_age_s=args.max_connection_age_s,
        tls=args.tls,
        tls_dir=args.tls_dir,
        rate_is_total=args.total_rate is not None,
    )
    try:
        asyncio.run(_run_foreground(config))
    except OSError as error:
        print(f"fake-exchange: {error}", file=sys.stderr)
        return 2
    return 0
