"""`collector web`: an aiohttp server with `GET /health` (JSON, 200 or 503) and `GET /metrics` (Prometheus).

Every blocking call (the Redis pipeline, the PostgreSQL probe, the Prometheus rendering) runs in a
small thread pool of the app's own, so a slow service never stalls the event loop and a burst of
probes cannot start more than `PROBE_THREADS` checks at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from collector.db.connection import check_postgres
from collector.errors import ConfigError, ServiceUnavailable
from collector.queue.client import check_redis, redis_client
from collector.settings import Settings
from collector.web.health import assess, now_us, report_redis, snapshot
from collector.web.metrics import make_registry, read_rest_weights

logger = logging.getLogger(__name__)

# Probes wait at most REDIS_SOCKET_TIMEOUT_S + DATABASE_CONNECT_TIMEOUT_S; four threads serve a
# Kubernetes probe, a Prometheus scrape and two humans without queueing behind a slow one.
PROBE_THREADS = 4


def make_app(settings: Settings) -> web.Application:
    """The application, with its Redis client and thread pool closed on cleanup."""
    app = web.Application()
    client = redis_client(settings)
    executor = ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="collector-web")
    take_snapshot = functools.partial(snapshot, settings, client)
    registry = make_registry(take_snapshot, functools.partial(read_rest_weights, client))

    async def health(request: web.Request) -> web.Response:
        snap = await asyncio.get_running_loop().run_in_executor(executor, take_snapshot)
        report = assess(snap, now_us(), settings)
        if not report.healthy:
            logger.info("web.unhealthy reasons=%s", "; ".join(report.reasons))
        return web.json_response(report.body, status=200 if report.healthy else 503)

    async def metrics(request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(executor, generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def cleanup(app: web.Application) -> None:
        # Do not wait for a probe stuck on a timeout; its thread ends on its own timeout.
        executor.shutdown(wait=False, cancel_futures=True)
        client.close()

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_cleanup.append(cleanup)
    return app


def run(settings: Settings) -> None:
    """Serve on WEB_HOST:WEB_PORT until SIGTERM or SIGINT.

    Redis or PostgreSQL down at start is no reason not to serve: /health is where an operator (or a
    container healthcheck) learns it, with 503 and the reason, until the service is back. Each one
    down gets one warning line at start, before `web.listening`.
    """
    try:
        check_redis(settings)
        report_redis(up=True)
    except ServiceUnavailable as error:
        report_redis(up=False, error=error)  # one warning; /health answers 503 until it is back
    try:
        check_postgres(settings)
    except ServiceUnavailable as error:
        logger.warning("web.postgres_unreachable error=%s (/health answers 503 until it is back)", error)
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    runner = web.AppRunner(make_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.web_host, settings.web_port)
        try:
            await site.start()
        except OSError as error:
            address = f"{settings.web_host}:{settings.web_port}"
            raise ConfigError(f"WEB_PORT: cannot listen on {address}: {error.strerror or error}") from None
        logger.info("web.listening host=%s port=%d", settings.web_host, settings.web_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("web.stopping")
    finally:
        await runner.cleanup()
