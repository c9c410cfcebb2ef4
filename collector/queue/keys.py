"""The Redis key layout: every key the collector reads or writes is named here and nowhere else.

| key | type | written by | read by | meaning |
|---|---|---|---|---|
| `collector:queue:<table>` | LIST | stream process, REST tasks (RPUSH) | drain (LPOP from the head) | envelopes waiting to be written, oldest first: shard 0 of the table's queue (the only one with `QUEUE_SHARDS=1`) |
| `collector:queue:<table>:s<k>` | LIST | stream process (RPUSH, `collector.queue.shards`) | drain | shard k (1..QUEUE_SHARDS-1) of the table's queue: the events of the symbols that hash to k, oldest first |
| `collector:inflight:<shard>` | SET | drain (claim script) | drain, web, status | keys of that shard's batches in flight; `<shard>` is `<table>` for shard 0, `<table>:s<k>` for shard k (as in every per-shard key below) |
| `collector:inflight:<shard>:<n>` | LIST | drain (claim script) | drain | one batch being written; deleted only after its COMMIT |
| `collector:inflight_seq:<shard>` | STRING | drain (claim script) | drain | counter numbering the shard's batches |
| `collector:lock:drain:<shard>` | STRING | drain (`collector.queue.locks`: SET NX PX, Lua release) | drain | token (`<host>/<pid>/<uuid>`) of the one drain allowed to write the shard |
| `collector:drain:wake` | LIST | stream process (one token per flush), REST tasks (one per body); trimmed to a few | drain loops (BLPOP with a timeout) | work has arrived: wakes one idle drain loop |
| `collector:drain:loops` | ZSET | drain loops (`collector.queue.loops`, Lua) | drain loops, status | member `<host>/<pid>/<uuid>` of each running drain loop, score = when its slot expires (ms); at most DRAIN_LOOPS members |
| `collector:drain:loops:<node>` | ZSET | drain loops (`collector.queue.loops`, Lua) | drain loops | the same, for the loops of one Celery worker node (`ingest@host`): at most its pool processes less one; expires with its last slot |
| `collector:deadletter` | LIST | stream process, drain, REST tasks (`collector.queue.deadletter.push`) | operators (`collector.queue.deadletter.read`) | JSON `{reason, source, market, table, symbol, connection, run, seq, received_at_us, dead_at_us, frame or frame_b64}` of what could not be stored; `frame` is the exact bytes received (base64 in `frame_b64` when not UTF-8), null fields where unknown |
| `collector:stream:messages` | HASH | stream process | web, status | field `<market>:<stream>` -> events received |
| `collector:stream:last_us` | HASH | stream process | web, status | field `<market>:<stream>` -> receive time (µs) of its last event |
| `collector:connections` | HASH | stream process | web, status | field `<connection id>` -> JSON `ConnectionRecord` of that WebSocket connection (`collector.queue.connections`) |
| `collector:drain:last_success_us` | HASH | drain | web, status | field `<table>` -> time (µs) of the last batch committed |
| `collector:drain:summary:<table>` | HASH | drain (`collector.queue.drain_summary`, every worker process) | drain | `since_us` and what that table's drains did since then (`runs`, `envelopes`, `inserted`, `duplicates`, `filtered`, `dead_letters`): the next `drain.summary` log line, summed over every process |
| `collector:metrics:<counter>` | HASH | everyone (HINCRBY) | web `/metrics` | field = label value(s) joined by `|`, value = counter |
| `collector:lock:alerts` | STRING | alert task (`collector.queue.locks`) | alert task | token of the one alert evaluation allowed to run |
| `collector:alerts` | pub/sub channel | alert task | subscribers | one JSON message per alert |
| `collector:rest:pause_until_us:<market>` | STRING | REST tasks | REST tasks | no REST call to that market before this time (429/418 Retry-After) |
| `collector:rest:weight:<market>:<minute>` | STRING | REST planner, resync fetcher (weight script) | planner, web `/metrics`, status | request weight spent on `market` in that UTC minute (epoch s // 60), raised to Binance's `X-MBX-USED-WEIGHT-1M` when that is higher |
| `collector:rest:cursor:<kind>:<market>` | HASH | REST planner (claim script) | REST planner | `next_due_us`, `counter`: the next scheduled poll of that kind and market, spread evenly over its interval |
| `collector:rest:limit_1m` | HASH | REST planner (from exchangeInfo `rateLimits`) | REST planner, REST client | field `<market>` -> REQUEST_WEIGHT per minute that the exchange announces |
| `collector:rest:limit_refresh:<market>` | STRING | REST planner (SET NX EX) | REST planner | present while that market's announced limit is fresh; the tick that creates it fetches exchangeInfo |
| `collector:rest:summary` | HASH | REST poll tick (`collector.queue.summary`, every worker process) | REST poll tick | `since_us` and the calls sent, failed and deferred since then: the next `rest.polls` log line, summed over every process |
| `collector:rest:plan` | HASH | REST planner | web, status | field `<market>` -> JSON of the market's weight plan (needed vs available per minute, stretch) |
| `collector:symbols:<market>` | STRING | stream process (symbol universe) | REST planner, web, status, trigger | JSON list of the symbols being recorded on `market` (resolved from exchangeInfo when `*_SYMBOLS=ALL`) |
| `collector:gaps:open` | HASH | stream process (each shard its own fields) | web, status, `collector gaps` | field `depth/<market>/<symbol>/<detected µs>` or `stream/<market>/<stream>` -> JSON of a gap still open |
| `collector:gaps:depth_last_u` | HASH | stream process (clean stop) | stream process (start: the shard owning the symbol takes its field) | field `<market>/<symbol>` -> last diff-depth `u` seen, to check continuity across a restart |
| `collector:streams:loop` | HASH | stream process (every second, `collector.queue.loop_lag`) | bench, web `/metrics`, status | field `<shard>` (`0/1` unsharded, `1/2`, ...) -> JSON `{max_block_ms` (longest event-loop block of this run), `max_cpu_ms` (most CPU time its thread used within one block), `blocks_over` (blocks past `block_warn_ms`), `block_warn_ms`, `started_us`, `updated_us}` |
| `collector:streams:shards` | HASH | stream process (every second; `state` stopped at a clean stop) | stream process (start), web, status | field `<shard>` -> JSON `ShardRecord` (`collector.queue.stream_shards`): run, host, pid, started_us, alive_us, state; found `running` at start, that shard's previous run crashed |
| `collector:streams:alive` | STRING | stream process before shards (heartbeat) | stream process (start, once: then deleted) | legacy: found at start, the previous (unsharded) run crashed |
| `collector:audit:queued` | HASH | stream process (its spill raises it for earlier runs' segments) | `collector audit` | field `<run>/<table>` -> the last event number of that run committed to the table's queue (a Redis list or the spill on disk); with shards the run of shard k is `<run>.s<k>` (each shard numbers its own events) |
| `collector:spill:<shard>` | HASH | stream process of that shard (`collector.queue.spill_stats`, every flush that spills or feeds back, and every second) | web `/metrics` and `/health`, status (every shard's, found by SCAN, combined) | `<shard>` is the stream shard's label (`0/1` unsharded, `1/2`, ...); fields `envelopes`, `bytes`, `segments`, `oldest_us` of its spill on disk (SPILL_DIR), `spilling` (1: some list's new envelopes go to disk), `queue_bytes` (estimated bytes in the lists it writes), `cap_bytes` (REDIS_MAX_QUEUE_BYTES), `drain_rate` (envelopes/s leaving those lists lately), `disk_free_bytes`, `updated_us`; kept after the process stops, so a stopped or crashed shard's spill still counts |
| `collector:spill_pending:<shard>` | HASH | stream process of that shard (in the same MULTI as `collector:spill:<shard>`; absent while nothing is on disk) | `collector audit` (every shard's, found by SCAN, merged) | field `<run>/<table>` -> envelopes of that run and table on that shard's disk, waiting to be fed back (queued, pending) |
| `collector:gaps:stream_outages` | HASH | stream process (clean stop) | stream process (start: the shard owning the stream takes its field) | field `<market>/<stream>` -> JSON of the outage the stop began, closed by the next start |

Envelope (one list element): `{"market": "spot"|"futures", "received_at_us": <int>, "frame": <raw JSON>}`;
events of the stream process also carry `"run": "<id>", "seq": <n>` after the time (collector.audit), numbered
per table and shard (the run of shard k > 0 is `<id>.s<k>`);
REST envelopes also carry `"symbol"` (the symbol asked for: spot depth bodies do not name it).
`frame` is the WebSocket frame or REST body exactly as received.
"""

from __future__ import annotations

import re
from typing import Final

PREFIX: Final = "collector"

TABLES: Final = (
    "agg_trades",
    "depth_updates",
    "mark_prices",
    "force_orders",
    "open_interest",
    "depth_snapshots",
    # The gap ledger, queued by the stream process (collector.gaps.records).
    "depth_gaps",
    "stream_gaps",
)

DEADLETTER: Final = f"{PREFIX}:deadletter"
STREAM_MESSAGES: Final = f"{PREFIX}:stream:messages"
STREAM_LAST_US: Final = f"{PREFIX}:stream:last_us"
CONNECTIONS: Final = f"{PREFIX}:connections"
DRAIN_LAST_SUCCESS_US: Final = f"{PREFIX}:drain:last_success_us"
ALERTS_CHANNEL: Final = f"{PREFIX}:alerts"
ALERTS_LOCK: Final = f"{PREFIX}:lock:alerts"
OPEN_GAPS: Final = f"{PREFIX}:gaps:open"
DEPTH_LAST_UPDATE_ID: Final = f"{PREFIX}:gaps:depth_last_u"
STREAM_OUTAGES: Final = f"{PREFIX}:gaps:stream_outages"
STREAMS_ALIVE: Final = f"{PREFIX}:streams:alive"
STREAMS_LOOP: Final = f"{PREFIX}:streams:loop"
STREAM_SHARDS: Final = f"{PREFIX}:streams:shards"
AUDIT_QUEUED: Final = f"{PREFIX}:audit:queued"
# What SCAN looks for to find every stream shard's spill hashes (both kinds), running, stopped or crashed.
SPILL_MATCH: Final = f"{PREFIX}:spill*:*/*"


def spill(shard: str) -> str:
    """The spill figures of the stream process of shard `shard` (its label, `0/1` unsharded)."""
    return f"{PREFIX}:spill:{shard}"


def spill_pending(shard: str) -> str:
    """`<run>/<table>` -> envelopes on the disk of the stream process of shard `shard`."""
    return f"{PREFIX}:spill_pending:{shard}"


def shard_name(table: str, shard: int = 0) -> str:
    """How every per-shard key names one shard of `table`'s queue: the table alone for shard 0 (the
    names from before sharding, so `QUEUE_SHARDS=1` keeps them), `<table>:s<k>` for shard k."""
    return table if shard == 0 else f"{table}:s{shard}"


def shard_run(run: str, shard: int) -> str:
    """The audit run of one queue shard: each shard numbers its own events, a FIFO of its own. Pure.

    Shard 0 keeps the stream process's run id, so `QUEUE_SHARDS=1` numbers as before sharding.
    """
    return run if shard == 0 else f"{run}.s{shard}"


_SHARD_RUN: Final = re.compile(r"\.s(\d+)$")


def shard_of_run(table: str, run: str) -> str:
    """The queue shard a run's numbers went through, as `shard_name` names it: `shard_run` undone. Pure."""
    match = _SHARD_RUN.search(run)
    return table if match is None else shard_name(table, int(match.group(1)))


def audit_field(run: str, name: str) -> str:
    """The `collector:audit:queued` field of one shard's events, from the stream process's `run` and
    the shard's `shard_name`. Pure."""
    table, _, shard = name.partition(":s")
    return f"{shard_run(run, int(shard) if shard else 0)}/{table}"


def queue(table: str, shard: int = 0) -> str:
    """The list of envelopes waiting to be written into `table` (one of its shards)."""
    return f"{PREFIX}:queue:{shard_name(table, shard)}"


def inflight(table: str, shard: int = 0) -> str:
    """The set of a shard's in-flight batch keys (use `collector.queue.batches.inflight_length`)."""
    return f"{PREFIX}:inflight:{shard_name(table, shard)}"


def inflight_batch_prefix(table: str, shard: int = 0) -> str:
    """Prefix of one in-flight batch's list key; the claim script appends the batch number."""
    return f"{PREFIX}:inflight:{shard_name(table, shard)}:"


def inflight_counter(table: str, shard: int = 0) -> str:
    """Counter that numbers a shard's batches."""
    return f"{PREFIX}:inflight_seq:{shard_name(table, shard)}"


def drain_lock(table: str, shard: int = 0) -> str:
    """The lock that keeps two drains of one shard of `table` from overlapping."""
    return f"{PREFIX}:lock:drain:{shard_name(table, shard)}"


# What SCAN looks for to find shards beyond QUEUE_SHARDS (the setting was lowered while they held work).
SHARD_KEYS_PATTERN: Final = f"{PREFIX}:*:s[0-9]*"
DRAIN_WAKE: Final = f"{PREFIX}:drain:wake"
DRAIN_LOOPS: Final = f"{PREFIX}:drain:loops"


def drain_loops_of(node: str) -> str:
    """The drain loop slots held on one Celery worker node."""
    return f"{PREFIX}:drain:loops:{node}"


def drain_summary(table: str) -> str:
    """What every process's drains of `table` did since its last `drain.summary` line."""
    return f"{PREFIX}:drain:summary:{table}"


def metric(counter: str) -> str:
    """The hash holding one counter's values by label."""
    return f"{PREFIX}:metrics:{counter}"


def rest_pause_until(market: str) -> str:
    """Time (µs) before which no REST request may go to `market` (set from Retry-After)."""
    return f"{PREFIX}:rest:pause_until_us:{market}"


def rest_weight(market: str, minute: int) -> str:
    """Request weight spent on `market` in UTC minute `minute` (epoch seconds // 60)."""
    return f"{PREFIX}:rest:weight:{market}:{minute}"


def rest_cursor(kind: str, market: str) -> str:
    """The next scheduled poll of `kind` (depth_snapshots, open_interest) on `market`."""
    return f"{PREFIX}:rest:cursor:{kind}:{market}"


REST_PLAN: Final = f"{PREFIX}:rest:plan"
REST_LIMITS: Final = f"{PREFIX}:rest:limit_1m"
REST_SUMMARY: Final = f"{PREFIX}:rest:summary"


def rest_limits_refresh(market: str) -> str:
    """Present while `market`'s published weight limit is fresh; whoever creates it refreshes it."""
    return f"{PREFIX}:rest:limit_refresh:{market}"


def symbols(market: str) -> str:
    """The symbols being recorded on `market`, as the stream process resolved them."""
    return f"{PREFIX}:symbols:{market}"


def stream_field(market: str, stream: str) -> str:
    """Field name used in the per-stream hashes."""
    return f"{market}:{stream}"
