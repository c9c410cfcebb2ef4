"""REST polls asked for by hand, and queueing a REST body for the drain.

Scheduled polls are spread over their intervals by `collector.rest.planner`; the functions here
poll a list of symbols at once (`collector trigger`, Flower), each call still within the weight budget.

Each body is wrapped, unmodified, in an envelope with its receive time and symbol and pushed onto
`collector:queue:open_interest` / `collector:queue:depth_snapshots`; the drain writes it to PostgreSQL.
A body that is not a JSON object goes to the dead-letter list instead. One symbol failing never
stops the others, except a rate-limit pause: the rest of that market is then skipped, since every
further request would only be refused (and repeating requests after a 429 earns a 418 ban).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson
import redis
import requests

from collector.binance.rest import Market, RestRequest, depth_request, open_interest_request
from collector.errors import RateLimited, RestError
from collector.queue import deadletter, shards
from collector.queue.deadletter import DeadLetter
from collector.queue.envelope import make_envelope
from collector.rest.client import RestClient, RestResponse
from collector.settings import Settings

logger = logging.getLogger(__name__)

MANUAL_MAX_WAIT_S = 65.0


@dataclass
class PollSummary:
    """What one poll did: the symbols queued, and the reason for each one that failed."""

    table: str
    market: str
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"table": self.table, "market": self.market, "ok": list(self.ok), "failed": dict(self.failed)}


def poll_open_interest(
    settings: Settings, client: redis.Redis, session: requests.Session, symbols: Iterable[str]
) -> PollSummary:
    """Fetch GET /fapi/v1/openInterest for each symbol and queue the bodies for `open_interest`."""
    base = settings.binance_futures_rest_url
    return _poll(
        settings,
        client,
        session,
        "open_interest",
        "futures",
        [open_interest_request(base, symbol) for symbol in symbols],
    )


def poll_depth_snapshots(
    settings: Settings, client: redis.Redis, session: requests.Session, market: Market, symbols: Iterable[str]
) -> PollSummary:
    """Fetch a `DEPTH_SNAPSHOT_LIMIT`-level book per symbol and queue the bodies for `depth_snapshots`."""
    base = settings.binance_spot_rest_url if market == "spot" else settings.binance_futures_rest_url
    return _poll(
        settings,
        client,
        session,
        "depth_snapshots",
        market,
        [depth_request(market, base, symbol, settings.depth_snapshot_limit) for symbol in symbols],
    )


def _poll(
    settings: Settings,
    client: redis.Redis,
    session: requests.Session,
    table: str,
    market: str,
    requests_: list[RestRequest],
) -> PollSummary:
    # A poll asked for by hand (`collector trigger`, Flower) runs in the rest pool: it may wait for
    # the next minute's weight rather than fail.
    rest = RestClient(settings, client, session, max_wait_s=MANUAL_MAX_WAIT_S)
    summary = PollSummary(table, market)
    for index, request in enumerate(requests_):
        symbol = request.symbol or ""
        try:
            response = rest.get(request)
        except RateLimited as error:
            for skipped in requests_[index:]:
                summary.failed[skipped.symbol or ""] = "rate_limited"
            logger.warning(
                "rest.poll_paused table=%s market=%s skipped=%d retry_after_s=%.1f",
                table,
                market,
                len(requests_) - index,
                error.retry_after_s,
            )
            break
        except RestError as error:
            summary.failed[symbol] = str(error)
            logger.warning("rest.gave_up table=%s market=%s symbol=%s error=%s", table, market, symbol, error)
            continue
        reason = queue_body(client, table, market, symbol, response)
        if reason:
            summary.failed[symbol] = reason
        else:
            summary.ok.append(symbol)
    logger.info(
        "rest.poll_done table=%s market=%s ok=%d failed=%d",
        table,
        market,
        len(summary.ok),
        len(summary.failed),
    )
    return summary


def queue_body(client: redis.Redis, table: str, market: str, symbol: str, response: RestResponse) -> str:
    """Push the envelope (or a dead letter); returns the failure reason, "" when queued."""
    reason = body_problem(response.body)
    if reason:
        # The house's one record: the body's exact bytes are kept, whatever they are.
        letter = DeadLetter(
            reason, "rest", market, table, response.received_at_us, response.body, symbol=symbol
        )
        pipe = client.pipeline(transaction=True)
        deadletter.push(pipe, [letter])
        pipe.execute()
        logger.error("rest.deadletter table=%s market=%s symbol=%s reason=%s", table, market, symbol, reason)
        return reason
    pipe = client.pipeline(transaction=True)  # shard 0 (no symbol to shard by), and wake a drain loop
    shards.push(
        pipe, table, 0, [make_envelope(market, response.received_at_us, response.body, symbol=symbol)]
    )
    pipe.execute()
    return ""


def body_problem(body: bytes) -> str:
    """Why `body` cannot be embedded in an envelope ("" when it can): it must be one JSON object."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        return f"body is not JSON: {error}"
    if not isinstance(parsed, dict):
        return "body is not a JSON object"
    return ""
