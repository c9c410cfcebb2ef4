"""Read new liquidations from PostgreSQL, decide alerts with the pure rules, write and publish them.

Two steps, each safe to interrupt anywhere:

1. Decide, in ONE transaction: read `force_orders` rows after the cursor (`alert_cursor`, by the
   commit-ordered `ingest_seq`), call `collector.alerts.rules.evaluate`, insert the alerts
   (`ON CONFLICT (alert_key) DO NOTHING`) and advance the cursor. A crash before the COMMIT
   leaves nothing; after it, the rows are never read again.
2. Publish, per alert with `published = false` in id order: append its line to ALERT_LOG unless
   the file's tail already has it (`collector.alerts.log`), fsync, PUBLISH it on
   `collector:alerts`, then set `published = true`. A crash between the write and the update
   finds the line on the retry: the file gets each alert exactly once. The channel is
   at-least-once (such a retry publishes again); subscribers can de-duplicate on `alert_key`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import orjson
import psycopg2.extensions
import psycopg2.extras
import redis

from collector.alerts import log
from collector.alerts.rules import Alert, Liquidation, Thresholds, evaluate, plain
from collector.queue import counters, keys
from collector.settings import Settings

logger = logging.getLogger(__name__)

CURSOR_NAME: Final = "force_orders"
# Stop starting new batches after this long, well inside the alert task's soft time limit (45 s).
RUN_MAX_S: Final = 30.0
PUBLISH_BATCH_ROWS: Final = 1000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ROW_COLUMNS = "ingest_seq, symbol, side, quantity, price, transaction_time"


@dataclass
class EvaluationSummary:
    """What one run did."""

    rows: int = 0  # force_orders rows read
    alerts: int = 0  # alerts newly decided (inserted)
    written: int = 0  # lines appended to ALERT_LOG
    published: int = 0  # alerts marked published (written now or by an interrupted run)


def to_us(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_us(time_us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=time_us)


def _liquidation(row: tuple[Any, ...]) -> Liquidation:
    seq, symbol, side, quantity, price, transaction_time = row
    return Liquidation(int(seq), symbol, side, Decimal(quantity), Decimal(price), to_us(transaction_time))


def evaluate_alerts(
    settings: Settings,
    conn: psycopg2.extensions.connection,
    client: redis.Redis,
    run_max_s: float = RUN_MAX_S,
) -> EvaluationSummary:
    """Decide and publish alerts for every new liquidation, batch after batch, for up to `run_max_s`."""
    thresholds = Thresholds.from_settings(settings)
    summary = EvaluationSummary()
    deadline = time.monotonic() + run_max_s
    while True:
        rows, decided = decide_batch(conn, thresholds, settings.alert_batch_max_rows)
        summary.rows += rows
        summary.alerts += decided
        written, published = publish_pending(settings, conn, client)
        summary.written += written
        summary.published += published
        if rows < settings.alert_batch_max_rows or time.monotonic() >= deadline:
            break
    if summary.rows or summary.published:
        # Every second with any liquidation: INFO only when an alert came of it.
        (logger.info if summary.alerts or summary.published else logger.debug)(
            "alerts.evaluated rows=%d alerts=%d written=%d published=%d",
            summary.rows,
            summary.alerts,
            summary.written,
            summary.published,
        )
    return summary


def decide_batch(
    conn: psycopg2.extensions.connection, thresholds: Thresholds, max_rows: int
) -> tuple[int, int]:
    """One transaction: read up to `max_rows` new rows, insert their alerts, advance the cursor."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO alert_cursor (name, last_ingest_seq) VALUES (%s, 0) ON CONFLICT (name) DO NOTHING",
            (CURSOR_NAME,),
        )
        # FOR UPDATE: should two evaluations ever overlap (lock expired), the second waits and
        # then reads the advanced cursor instead of deciding the same rows again.
        cur.execute("SELECT last_ingest_seq FROM alert_cursor WHERE name = %s FOR UPDATE", (CURSOR_NAME,))
        (cursor_seq,) = cur.fetchone()
        cur.execute(
            f"SELECT {_ROW_COLUMNS} FROM force_orders WHERE ingest_seq > %s ORDER BY ingest_seq LIMIT %s",
            (cursor_seq, max_rows),
        )
        new = [_liquidation(row) for row in cur.fetchall()]
        if not new:
            return 0, 0
        symbols = sorted({row.symbol for row in new})
        recent = _recent(cur, new, symbols, cursor_seq, thresholds.window_us)
        cur.execute(
            "SELECT symbol, rule, max(liquidation_time) FROM alerts "
            "WHERE symbol = ANY(%s) GROUP BY symbol, rule",
            (symbols,),
        )
        last_alert_times = {(symbol, rule): to_us(moment) for symbol, rule, moment in cur.fetchall()}
        alerts = evaluate(new, recent, last_alert_times, thresholds)
        inserted = _insert(cur, alerts)
        cur.execute(
            "UPDATE alert_cursor SET last_ingest_seq = %s WHERE name = %s",
            (max(row.ingest_seq for row in new), CURSOR_NAME),
        )
    return len(new), inserted


def _recent(
    cur: psycopg2.extensions.cursor,
    new: list[Liquidation],
    symbols: list[str],
    cursor_seq: int,
    window_us: int,
) -> list[Liquidation]:
    """Rows already evaluated that fall into the window of some new row."""
    low = min(row.time_us for row in new) - window_us
    high = max(row.time_us for row in new)
    cur.execute(
        f"SELECT {_ROW_COLUMNS} FROM force_orders WHERE symbol = ANY(%s) AND transaction_time > %s "
        "AND transaction_time <= %s AND ingest_seq <= %s",
        (symbols, from_us(low), from_us(high), cursor_seq),
    )
    return [_liquidation(row) for row in cur.fetchall()]


def _insert(cur: psycopg2.extensions.cursor, alerts: list[Alert]) -> int:
    if not alerts:
        return 0
    rows = [
        (a.alert_key, from_us(a.time_us), a.rule, a.symbol, a.side, a.quantity, a.price, a.notional, a.line)
        for a in alerts
    ]
    inserted = psycopg2.extras.execute_values(
        cur,
        "INSERT INTO alerts (alert_key, created_at, liquidation_time, rule, symbol, side, quantity, price, "
        "notional_usd, line) SELECT v.k, now(), v.t, v.r, v.s, v.sd, v.q, v.p, v.n, v.l "
        "FROM (VALUES %s) AS v(k, t, r, s, sd, q, p, n, l) "
        "ON CONFLICT (alert_key) DO NOTHING RETURNING alert_id",
        rows,
        template="(%s, %s::timestamptz, %s, %s, %s, %s::numeric, %s::numeric, %s::numeric, %s)",
        fetch=True,
    )
    return len(inserted)


def publish_pending(
    settings: Settings, conn: psycopg2.extensions.connection, client: redis.Redis
) -> tuple[int, int]:
    """Write, publish and mark every unpublished alert in id order; (lines written, alerts marked)."""
    written = published = 0
    while True:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT alert_id, alert_key, rule, symbol, side, quantity, price, notional_usd, "
                "liquidation_time, line FROM alerts WHERE NOT published ORDER BY alert_id LIMIT %s",
                (PUBLISH_BATCH_ROWS,),
            )
            pending = cur.fetchall()
        for row in pending:
            written += _publish_one(settings, conn, client, row)
            published += 1
        if len(pending) < PUBLISH_BATCH_ROWS:
            return written, published


def _publish_one(
    settings: Settings, conn: psycopg2.extensions.connection, client: redis.Redis, row: tuple[Any, ...]
) -> int:
    alert_id, key, rule, symbol, side, quantity, price, notional, moment, line = row
    wrote = log.append_once(settings.alert_log, key, line)
    if not wrote:
        logger.warning("alerts.already_written id=%s key=%s", alert_id, key)
    message = {
        "alert_id": alert_id,
        "alert_key": key,
        "rule": rule,
        "symbol": symbol,
        "side": side,
        "quantity": plain(quantity),
        "price": plain(price),
        "notional_usd": plain(notional),
        "liquidation_time": moment.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "line": line,
    }
    client.publish(keys.ALERTS_CHANNEL, orjson.dumps(message))
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE alerts SET published = true WHERE alert_id = %s", (alert_id,))
    counters.incr(client, "alerts", rule)
    logger.info("alerts.published id=%s rule=%s symbol=%s key=%s", alert_id, rule, symbol, key)
    return int(wrote)
