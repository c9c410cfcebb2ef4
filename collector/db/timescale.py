"""All TimescaleDB SQL lives here: whether it can be used, hypertables, compression, retention (and the
pruning of `ingest_ranges` that follows it) and the continuous aggregates, brought in line with the
settings by `collector init-db`.

TimescaleDB works only when the server preloads its library (`shared_preload_libraries`); without
that, `CREATE EXTENSION` ends the session with FATAL, and in a database where the extension already
exists inserts silently bypass the hypertables' chunks. So `decide()` uses it exactly when the
server can load it, and refuses the broken state outright.

Reconciliation is read → plan → execute: `read_*` collect the catalog's view of each object, the
pure `plan_*` functions compare it with the settings and return `Change`s (a statement and the line
an operator reads), and `apply()` executes them. A run with nothing to change executes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from psycopg2.extensions import cursor as Cursor

from collector.db.aggregates import AGGREGATES, BUCKET_WIDTH, Aggregate, plain_view_sql, select_sql
from collector.db.schema import NATURAL_KEYS, TIME_COLUMNS
from collector.errors import ConfigError
from collector.settings import Settings

logger = logging.getLogger(__name__)

PRELOAD_FIX: Final = "set shared_preload_libraries = 'timescaledb' in postgresql.conf and restart PostgreSQL"

# Compressed chunks are grouped by these columns, so queries for one symbol read one segment.
SEGMENT_BY: Final = {
    "agg_trades": "market, symbol",
    "depth_updates": "market, symbol",
    "mark_prices": "symbol",
    "force_orders": "symbol",
    "open_interest": "symbol",
    "depth_snapshots": "market_type, symbol",
    "depth_gaps": "market, symbol",
    "stream_gaps": "market, stream",
}

# The newest bucket is still filling; the refresh policy stops one bucket short of now, and
# real-time aggregation computes the rest at query time.
AGGREGATE_END_OFFSET: Final = timedelta(minutes=1)


def order_by(table: str) -> str:
    """Newest first, then the rest of the natural key: TimescaleDB wants every unique-key column in
    segment-by or order-by, so a re-delivered row can be found (and skipped) inside a compressed chunk."""
    segment = {c.strip() for c in SEGMENT_BY[table].split(",")}
    time_column = TIME_COLUMNS[table]
    rest = [c for c in NATURAL_KEYS[table] if c not in segment and c != time_column]
    return ", ".join([f"{time_column} DESC", *rest])


# --- can it be used? ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSupport:
    """What the server and this database say about TimescaleDB."""

    installed: str | None  # version the server could create (pg_available_extensions), None: absent
    created: str | None  # version created in this database (pg_extension)
    preloaded: bool  # the loader library is in shared_preload_libraries


@dataclass(frozen=True)
class Decision:
    use: bool
    warning: str | None = None


def read_support(cur: Cursor) -> ServerSupport:
    # shared_preload_libraries is visible to superusers only (pg_settings hides it from other
    # roles); the loader's own settings, registered only when it is preloaded, are visible to all.
    cur.execute(
        """
        SELECT (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'),
               (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'),
               (SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'),
               EXISTS (SELECT 1 FROM pg_settings
                       WHERE name = 'timescaledb.max_background_workers' AND vartype = 'integer')
        """
    )
    installed, created, libraries, loader_settings = cur.fetchone()
    if libraries is None:
        preloaded = bool(loader_settings)
    else:
        preloaded = "timescaledb" in (name.strip().strip('"') for name in libraries.split(","))
    return ServerSupport(installed=installed, created=created, preloaded=preloaded)


def decide(support: ServerSupport, mode: str) -> Decision:
    """Use TimescaleDB when it works (TIMESCALE=auto|require|off); `ConfigError` when it must and cannot."""
    if support.created and not support.preloaded:
        raise ConfigError(
            f"timescaledb {support.created} is created in this database but the server does not "
            f"preload it, so inserts would bypass the hypertables; {PRELOAD_FIX}"
        )
    if mode == "off":
        if support.created:
            return Decision(
                False,
                "TIMESCALE=off, but this database already uses TimescaleDB: "
                "its hypertables and aggregates stay as they are and TIMESCALE_* are not applied",
            )
        return Decision(False)
    if support.preloaded and support.installed:
        return Decision(True)
    if support.installed:
        reason = f"timescaledb {support.installed} is installed but not preloaded"
        fix = PRELOAD_FIX
    else:
        reason = "the timescaledb extension is not installed on this PostgreSQL server"
        fix = "install TimescaleDB (or use the timescale/timescaledb image) and preload it"
    if mode == "require":
        raise ConfigError(f"TIMESCALE=require: {reason}; {fix}, then run init-db again")
    return Decision(
        False, f"{reason}: using plain PostgreSQL tables; for hypertables {fix}, then run init-db again"
    )


def describe(cur: Cursor) -> dict[str, object]:
    """Which mode the database is in, for `collector status` and /health."""
    support = read_support(cur)
    if support.created and not support.preloaded:
        return {
            "mode": "broken",
            "ok": False,
            "detail": f"timescaledb created but not preloaded; {PRELOAD_FIX}",
        }
    if support.created:
        cur.execute("SELECT count(*) FROM timescaledb_information.hypertables")
        hypertables = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM timescaledb_information.continuous_aggregates")
        aggregates = cur.fetchone()[0]
        detail = (
            f"TimescaleDB {support.created}: {hypertables} hypertables, {aggregates} continuous aggregates"
        )
        return {"mode": "timescaledb", "ok": True, "version": support.created, "detail": detail}
    if support.installed and support.preloaded:
        detail = f"plain PostgreSQL tables; TimescaleDB {support.installed} can be used: run init-db"
    elif support.installed:
        detail = f"plain PostgreSQL tables; TimescaleDB {support.installed} installed but not preloaded"
    else:
        detail = "plain PostgreSQL tables; TimescaleDB not installed"
    return {"mode": "plain", "ok": True, "detail": detail}


# --- what the settings ask for, and what the catalog has ------------------------------------------


@dataclass(frozen=True)
class HypertablePolicy:
    chunk_interval: timedelta
    compress_after: timedelta | None  # None: no compression policy
    retention: timedelta | None  # None: keep forever


@dataclass(frozen=True)
class HypertableState:
    chunk_interval: timedelta
    compression_enabled: bool
    segment_by: str
    order_by: str
    compress_after: timedelta | None
    retention: timedelta | None


@dataclass(frozen=True)
class RefreshPolicy:
    start_offset: timedelta
    end_offset: timedelta
    schedule_interval: timedelta


@dataclass(frozen=True)
class AggregateState:
    kind: str  # "missing", "view" (a plain view) or "continuous"
    materialized_only: bool = False
    refresh: RefreshPolicy | None = None


@dataclass(frozen=True)
class Change:
    statement: str
    line: str  # what `init-db` prints for it


def hypertable_policy(settings: Settings) -> HypertablePolicy:
    days = settings.timescale_compress_after_days
    retention = settings.timescale_retention_days
    return HypertablePolicy(
        chunk_interval=timedelta(hours=settings.timescale_chunk_interval_h),
        compress_after=timedelta(days=days) if days else None,
        retention=timedelta(days=retention) if retention else None,
    )


def refresh_policy(settings: Settings) -> RefreshPolicy:
    return RefreshPolicy(
        start_offset=timedelta(hours=settings.timescale_aggregate_lookback_h),
        end_offset=AGGREGATE_END_OFFSET,
        schedule_interval=timedelta(seconds=settings.timescale_aggregate_refresh_interval_s),
    )


def interval(value: timedelta) -> str:
    """A timedelta as a SQL interval literal (whole seconds: every setting is whole hours or seconds)."""
    return f"INTERVAL '{int(value.total_seconds())} seconds'"


def human(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0 and seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if unit == 'day' and count > 1 else ''}"
    return f"{seconds} s"


# --- plans: pure ------------------------------------------------------------------------------------


def plan_hypertable(table: str, state: HypertableState | None, policy: HypertablePolicy) -> list[Change]:
    """The changes that bring one table's hypertable, chunk interval, compression and retention in line."""
    changes: list[Change] = []
    if state is None:
        changes.append(
            Change(
                f"SELECT create_hypertable('{table}', '{TIME_COLUMNS[table]}', "
                f"chunk_time_interval => {interval(policy.chunk_interval)}, "
                "migrate_data => TRUE, create_default_indexes => FALSE)",
                f"{table}: hypertable on {TIME_COLUMNS[table]}, chunks of {human(policy.chunk_interval)}",
            )
        )
        state = HypertableState(policy.chunk_interval, False, "", "", None, None)
    elif state.chunk_interval != policy.chunk_interval:
        changes.append(
            Change(
                f"SELECT set_chunk_time_interval('{table}', {interval(policy.chunk_interval)})",
                f"{table}: chunk interval {human(state.chunk_interval)} -> {human(policy.chunk_interval)} "
                "(for chunks created from now on)",
            )
        )
    changes += _plan_compression(table, state, policy.compress_after)
    changes += _plan_retention(table, state.retention, policy.retention)
    return changes


def _plan_compression(table: str, state: HypertableState, compress_after: timedelta | None) -> list[Change]:
    changes: list[Change] = []
    wanted = (SEGMENT_BY[table], order_by(table))
    if compress_after is not None and (
        not state.compression_enabled or (state.segment_by, state.order_by) != wanted
    ):
        changes.append(
            Change(
                f"ALTER TABLE {table} SET (timescaledb.compress, timescaledb.compress_segmentby = "
                f"'{wanted[0]}', timescaledb.compress_orderby = '{wanted[1]}')",
                f"{table}: compression by {wanted[0]}, ordered by {wanted[1]}",
            )
        )
    if state.compress_after == compress_after:
        return changes
    if state.compress_after is not None:
        removed = "" if compress_after else f"{table}: compression policy removed (compressed chunks stay so)"
        changes.append(Change(f"SELECT remove_compression_policy('{table}')", removed))
    if compress_after is not None:
        was = f" (was {human(state.compress_after)})" if state.compress_after else ""
        changes.append(
            Change(
                f"SELECT add_compression_policy('{table}', {interval(compress_after)})",
                f"{table}: compress chunks older than {human(compress_after)}{was}",
            )
        )
    return changes


def _plan_retention(table: str, current: timedelta | None, wanted: timedelta | None) -> list[Change]:
    if current == wanted:
        return []
    changes: list[Change] = []
    if current is not None:
        removed = "" if wanted else f"{table}: retention policy removed (rows are kept forever)"
        changes.append(Change(f"SELECT remove_retention_policy('{table}')", removed))
    if wanted is not None:
        was = f" (was {human(current)})" if current else ""
        changes.append(
            Change(
                f"SELECT add_retention_policy('{table}', {interval(wanted)})",
                f"{table}: drop chunks older than {human(wanted)}{was}",
            )
        )
    return changes


def continuous_aggregate_sql(aggregate: Aggregate) -> str:
    bucket = f"time_bucket(INTERVAL '{BUCKET_WIDTH}', {aggregate.time_column})"
    return (
        f"CREATE MATERIALIZED VIEW {aggregate.name} WITH (timescaledb.continuous, "
        "timescaledb.materialized_only = false) AS "
        f"{select_sql(aggregate, bucket, timescale=True)} WITH NO DATA"
    )


def plan_aggregate(aggregate: Aggregate, state: AggregateState, policy: RefreshPolicy) -> list[Change]:
    """Create the continuous aggregate (replacing a plain view of the same name) and its refresh policy."""
    name = aggregate.name
    changes: list[Change] = []
    if state.kind != "continuous":
        if state.kind == "view":
            changes.append(Change(f"DROP VIEW {name}", ""))
        replaced = " (replaces the plain view)" if state.kind == "view" else ""
        changes.append(
            Change(
                continuous_aggregate_sql(aggregate),
                f"{name}: continuous aggregate of {aggregate.source}{replaced}",
            )
        )
        state = AggregateState("continuous", materialized_only=False)
    if state.materialized_only:
        changes.append(
            Change(
                f"ALTER MATERIALIZED VIEW {name} SET (timescaledb.materialized_only = false)",
                f"{name}: real-time aggregation on (the newest buckets are computed at query time)",
            )
        )
    if state.refresh == policy:
        return changes
    if state.refresh is not None:
        changes.append(Change(f"SELECT remove_continuous_aggregate_policy('{name}')", ""))
    changes.append(
        Change(
            f"SELECT add_continuous_aggregate_policy('{name}', "
            f"start_offset => {interval(policy.start_offset)}, end_offset => {interval(policy.end_offset)}, "
            f"schedule_interval => {interval(policy.schedule_interval)})",
            f"{name}: refreshed every {human(policy.schedule_interval)} over the last "
            f"{human(policy.start_offset)}",
        )
    )
    return changes


# --- ingest_ranges: pruned at the retention of the table each range describes ----------------------
#
# `collector audit` reads a table's rows through its ranges, so a range must go when its rows go and
# not before. The procedure reads each table's `drop_after` from the catalog at every run: it follows
# a retention policy changed by init-db or by hand, and a table without one keeps its ranges, as it
# keeps its rows. Same horizon as the policy (now() - drop_after); the policy drops whole chunks, so
# rows outlive their ranges by at most one chunk interval, never the other way round.

PRUNE_PROCEDURE: Final = "prune_ingest_ranges"
PRUNE_SCHEDULE: Final = timedelta(hours=1)
PRUNE_BODY: Final = """
DELETE FROM ingest_ranges AS r
USING timescaledb_information.jobs AS j
WHERE j.proc_name = 'policy_retention'
  AND j.hypertable_schema = current_schema()
  AND j.hypertable_name = r.table_name
  AND r.last_received_at < now() - (j.config->>'drop_after')::interval
"""


@dataclass(frozen=True)
class PruneJobState:
    body: str | None  # the procedure's body in pg_proc, None: missing
    scheduled: bool  # a job runs it


def prune_procedure_sql() -> str:
    # TimescaleDB calls a job's procedure with (job_id, config). The search path is the one init-db
    # ran with, so the background job finds the same tables.
    return (
        f"CREATE OR REPLACE PROCEDURE {PRUNE_PROCEDURE}(job_id integer, config jsonb) "
        f"LANGUAGE sql SET search_path FROM CURRENT AS $${PRUNE_BODY}$$"
    )


def plan_prune_job(state: PruneJobState) -> list[Change]:
    """The procedure (replaced when its body changed) and the job that runs it every PRUNE_SCHEDULE."""
    changes: list[Change] = []
    if state.body != PRUNE_BODY:
        line = "ingest_ranges: prune procedure updated" if state.scheduled else ""
        changes.append(Change(prune_procedure_sql(), line))
    if not state.scheduled:
        changes.append(
            Change(
                f"SELECT add_job('{PRUNE_PROCEDURE}', {interval(PRUNE_SCHEDULE)})",
                f"ingest_ranges: every {human(PRUNE_SCHEDULE)}, ranges older than their table's "
                f"retention are dropped ({PRUNE_PROCEDURE})",
            )
        )
    return changes


def read_prune_job(cur: Cursor) -> PruneJobState:
    cur.execute(
        "SELECT prosrc FROM pg_proc WHERE proname = %s AND pronamespace = current_schema()::regnamespace",
        (PRUNE_PROCEDURE,),
    )
    found = cur.fetchone()
    cur.execute(
        "SELECT count(*) FROM timescaledb_information.jobs"
        " WHERE proc_name = %s AND proc_schema = current_schema()",
        (PRUNE_PROCEDURE,),
    )
    return PruneJobState(body=found[0] if found else None, scheduled=cur.fetchone()[0] > 0)


def read_retention(cur: Cursor) -> dict[str, timedelta]:
    """Each hypertable's retention (`drop_after` of its policy); empty without TimescaleDB."""
    support = read_support(cur)
    if not (support.created and support.preloaded):  # no policy runs: nothing is dropped
        return {}
    return {
        name: job["drop_after"]
        for (name, proc), job in _read_jobs(cur).items()
        if proc == "policy_retention" and "drop_after" in job
    }


# --- storage_usage: disk use per table, the same view on both -------------------------------------

STORAGE_VIEW: Final = "storage_usage"
_MARKET_TABLE_ARRAY = "ARRAY[" + ", ".join(f"'{t}'" for t in TIME_COLUMNS) + "]"


def storage_view_sql(with_timescale: bool) -> str:
    """`storage_usage` (table_name, total_bytes, before/after_compression_bytes, compression_ratio).

    A hypertable's rows live in its chunks, so pg_total_relation_size of the table itself says
    nothing there: with TimescaleDB the sizes come from hypertable_size and the compression stats.
    """
    if with_timescale:
        body = (
            "SELECT t.table_name, hypertable_size(t.table_name::regclass) AS total_bytes, "
            "s.before AS before_compression_bytes, s.after AS after_compression_bytes, "
            "round(s.before::numeric / NULLIF(s.after, 0), 2) AS compression_ratio "
            f"FROM unnest({_MARKET_TABLE_ARRAY}) AS t(table_name) "
            "CROSS JOIN LATERAL (SELECT sum(before_compression_total_bytes)::bigint AS before, "
            "sum(after_compression_total_bytes)::bigint AS after "
            "FROM hypertable_compression_stats(t.table_name::regclass)) AS s"
        )
    else:
        body = (
            "SELECT t.table_name, pg_total_relation_size(t.table_name::regclass) AS total_bytes, "
            "NULL::bigint AS before_compression_bytes, NULL::bigint AS after_compression_bytes, "
            "NULL::numeric AS compression_ratio "
            f"FROM unnest({_MARKET_TABLE_ARRAY}) AS t(table_name)"
        )
    return f"CREATE OR REPLACE VIEW {STORAGE_VIEW} AS {body}"


def plan_storage_view(current_definition: str | None, with_timescale: bool) -> list[Change]:
    """Create the view, or switch it to the TimescaleDB flavour once the tables are hypertables."""
    if current_definition is not None and ("hypertable_size" in current_definition) == with_timescale:
        return []
    flavour = "hypertable sizes and compression" if with_timescale else "table sizes"
    return [Change(storage_view_sql(with_timescale), f"{STORAGE_VIEW}: view of {flavour}")]


# --- catalog reads and execution: I/O ---------------------------------------------------------------


def read_hypertables(cur: Cursor) -> dict[str, HypertableState]:
    cur.execute(
        """
        SELECT h.hypertable_name, d.time_interval, h.compression_enabled
        FROM timescaledb_information.hypertables h
        JOIN timescaledb_information.dimensions d USING (hypertable_schema, hypertable_name)
        WHERE h.hypertable_schema = current_schema() AND d.dimension_number = 1
        """
    )
    found = {name: (chunk, enabled) for name, chunk, enabled in cur.fetchall()}
    cur.execute(
        """
        SELECT hypertable_name, attname, segmentby_column_index, orderby_column_index, orderby_asc
        FROM timescaledb_information.compression_settings
        WHERE hypertable_schema = current_schema()
        ORDER BY hypertable_name, segmentby_column_index, orderby_column_index
        """
    )
    segment: dict[str, list[str]] = {}
    order: dict[str, list[str]] = {}
    for name, column, segment_index, order_index, ascending in cur.fetchall():
        if segment_index is not None:
            segment.setdefault(name, []).append(column)
        if order_index is not None:
            order.setdefault(name, []).append(column if ascending else f"{column} DESC")
    jobs = _read_jobs(cur)
    return {
        name: HypertableState(
            chunk_interval=chunk,
            compression_enabled=enabled,
            segment_by=", ".join(segment.get(name, [])),
            order_by=", ".join(order.get(name, [])),
            compress_after=jobs.get((name, "policy_compression"), {}).get("compress_after"),
            retention=jobs.get((name, "policy_retention"), {}).get("drop_after"),
        )
        for name, (chunk, enabled) in found.items()
    }


def _read_jobs(cur: Cursor) -> dict[tuple[str, str], dict[str, timedelta]]:
    """Policy jobs by (hypertable or aggregate name, procedure), with their intervals."""
    cur.execute(
        """
        SELECT hypertable_name, proc_name, schedule_interval,
               (config->>'compress_after')::interval, (config->>'drop_after')::interval,
               (config->>'start_offset')::interval, (config->>'end_offset')::interval
        FROM timescaledb_information.jobs
        WHERE hypertable_schema = current_schema()
        """
    )
    keys = ("schedule_interval", "compress_after", "drop_after", "start_offset", "end_offset")
    return {
        (name, proc): {k: v for k, v in zip(keys, values, strict=True) if v is not None}
        for name, proc, *values in cur.fetchall()
    }


def read_aggregates(cur: Cursor, with_timescale: bool) -> dict[str, AggregateState]:
    cur.execute(
        "SELECT relname FROM pg_class WHERE relkind = 'v' AND relnamespace = current_schema()::regnamespace"
    )
    states = {name: AggregateState("view") for (name,) in cur.fetchall()}
    if not with_timescale:
        return states
    jobs = _read_jobs(cur)
    cur.execute(
        "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates "
        "WHERE view_schema = current_schema()"
    )
    for name, materialized_only in cur.fetchall():
        job = jobs.get((name, "policy_refresh_continuous_aggregate"))
        refresh = (
            RefreshPolicy(job["start_offset"], job["end_offset"], job["schedule_interval"]) if job else None
        )
        states[name] = AggregateState("continuous", materialized_only, refresh)
    return states


def _execute(cur: Cursor, changes: list[Change]) -> list[str]:
    for change in changes:
        cur.execute(change.statement)
    return [change.line for change in changes if change.line]


def apply(cur: Cursor, settings: Settings) -> tuple[bool, list[str]]:
    """Bring TimescaleDB (or the plain-PostgreSQL equivalents) in line with the settings.

    Returns whether TimescaleDB is in use and one line per change made. Runs inside init-db's
    transaction, after the tables exist.
    """
    support = read_support(cur)
    decision = decide(support, settings.timescale)
    if decision.warning:
        logger.warning("initdb.timescale %s", decision.warning)
    lines: list[str] = []
    if decision.use:
        cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
        if cur.fetchone() is None:
            cur.execute("CREATE EXTENSION timescaledb")
            cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
            lines.append(f"extension timescaledb {cur.fetchone()[0]} created")
        hypertables = read_hypertables(cur)
        policy = hypertable_policy(settings)
        for table in TIME_COLUMNS:
            lines += _execute(cur, plan_hypertable(table, hypertables.get(table), policy))
    if decision.use or support.created:
        # With TIMESCALE=off the hypertables' retention policies still drop chunks: so go the ranges.
        lines += _execute(cur, plan_prune_job(read_prune_job(cur)))
    cur.execute("SELECT pg_get_viewdef(to_regclass(%s))", (STORAGE_VIEW,))
    lines += _execute(cur, plan_storage_view(cur.fetchone()[0], decision.use))
    states = read_aggregates(cur, decision.use)
    for aggregate in AGGREGATES:
        state = states.get(aggregate.name, AggregateState("missing"))
        if decision.use:
            lines += _execute(cur, plan_aggregate(aggregate, state, refresh_policy(settings)))
        elif state.kind == "missing":
            cur.execute(plain_view_sql(aggregate))
            lines.append(f"{aggregate.name}: view of {aggregate.source} (computed at query time)")
    return decision.use, lines
