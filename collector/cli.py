"""The `collector` command: one sub-command per part of the system.

Errors an operator can fix (bad settings, a service that is down) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from collector.errors import ConfigError, ServiceUnavailable, error_lines
from collector.preflight import CHECKED_BY_THE_COMMAND, COMMAND_NEEDS, check_services
from collector.queue.keys import TABLES
from collector.settings import Market, Settings, get_settings

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

EXIT_CONFIG = 2


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _cmd_streams(args: argparse.Namespace, settings: Settings) -> int:
    from collector.streams.runner import run

    return run(settings)


def _cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    from collector.web.server import run

    run(settings)
    return 0


def _cmd_flower(args: argparse.Namespace, settings: Settings) -> int:
    from collector.web.flower import run

    return run(settings)


def _cmd_init_db(args: argparse.Namespace, settings: Settings) -> int:
    from collector.db.init import init_db

    # One line per change on stdout, nothing when everything already matched the settings.
    for line in init_db(settings).changes:
        print(line)
    return 0


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from collector.web.status import render

    text, healthy = render(settings, args.stack)
    print(text)
    return 0 if healthy else 1


def _cmd_trigger(args: argparse.Namespace, settings: Settings) -> int:
    from collector.celery import app
    from collector.schedule import TASK_QUEUES

    name, task_args, task_kwargs = _trigger_call(args, settings)
    check_services(settings, COMMAND_NEEDS["trigger"])  # after the arguments: see CHECKED_BY_THE_COMMAND
    result = _send(app, name, task_args, task_kwargs, settings)
    # Every trigger says what went where: the task, its arguments by name, the queue and the id.
    named = {**({"table": task_args[0]} if task_args else {}), **task_kwargs}
    shown = "".join(f" {key}={'all' if value is None else value}" for key, value in named.items())
    print(f"sent {name}{shown} to queue {TASK_QUEUES[name]} (id {result.id})")
    return 0


def _send(
    app: Celery, name: str, task_args: list[object], task_kwargs: dict[str, object], settings: Settings
) -> AsyncResult:
    """Send the task once: a broker that went away since the start-up check is one line, not
    kombu's retries and a traceback."""
    import redis
    from kombu.exceptions import OperationalError

    from collector.queue.client import redis_unavailable

    try:
        # One connection attempt: kombu would otherwise retry it for broker_connection_timeout.
        with app.connection_for_write(transport_options={"max_retries": 0}) as connection:
            return app.send_task(name, args=task_args, kwargs=task_kwargs, connection=connection, retry=False)
    except OperationalError as error:
        # kombu wraps redis-py's error; its cause says what happened.
        cause = error.__cause__ if isinstance(error.__cause__, redis.RedisError) else None
        raise redis_unavailable(settings, cause or redis.ConnectionError(str(error))) from None


# The options each `collector trigger <what>` reads; any other is refused rather than ignored.
TRIGGER_OPTIONS = {
    "drain": ("table",),
    "open-interest": ("symbol", "market"),  # --market futures only: open interest is a futures figure
    "depth-snapshot": ("symbol", "market"),
    "alerts": (),
}


def _trigger_call(
    args: argparse.Namespace, settings: Settings
) -> tuple[str, list[object], dict[str, object]]:
    """Map `collector trigger <what>` to a task name and its arguments, refusing what cannot work."""
    takes = TRIGGER_OPTIONS[args.what]
    for option in ("table", "symbol", "market"):
        if getattr(args, option) is not None and option not in takes:
            allowed = ", ".join(f"--{name}" for name in takes) or "no options"
            raise ConfigError(f"trigger {args.what}: --{option} does not apply (it takes {allowed})")
    if args.what == "open-interest" and args.market == "spot":
        raise ConfigError("trigger open-interest: --market spot does not apply (futures only)")
    if args.symbol is not None:
        args.symbol = _configured_symbol(args.symbol, args.market, args.what, settings)
    if args.what == "drain":
        if args.table is None:
            raise ConfigError(f"trigger drain needs --table (one of {', '.join(TABLES)})")
        return "collector.tasks.ingest.drain", [args.table], {}
    if args.what == "open-interest":
        return "collector.tasks.rest.open_interest", [], {"symbol": args.symbol}
    if args.what == "depth-snapshot":
        return "collector.tasks.rest.depth_snapshot", [], {"market": args.market, "symbol": args.symbol}
    return "collector.tasks.alerts.evaluate", [], {}


def _configured_symbol(symbol: str, market: str | None, what: str, settings: Settings) -> str:
    """`symbol` upper-cased when a market it is asked for records it; else one ConfigError line.

    An ALL market records the list the stream process resolved and published; it is read from Redis.
    """
    wanted = symbol.strip().upper()
    markets: list[Market] = ["spot", "futures"]
    if what == "open-interest":
        markets = ["futures"]
    elif market is not None:
        markets = ["spot" if market == "spot" else "futures"]  # argparse allows only these two
    recorded = {m: _recorded_symbols(m, settings) for m in markets}
    if any(wanted in symbols for symbols in recorded.values()):
        return wanted
    listed = "; ".join(_describe_symbols(m, recorded[m], settings) for m in markets)
    raise ConfigError(f"trigger {what}: {wanted} is not a configured symbol ({listed})")


def _recorded_symbols(market: Market, settings: Settings) -> list[str]:
    if not settings.symbols_all(market):
        return list(settings.symbols(market))
    import redis

    from collector.queue.client import redis_client, redis_unavailable
    from collector.queue.symbols import current_symbols

    client = redis_client(settings)
    try:
        return current_symbols(settings, client, market)
    except redis.RedisError as error:
        raise redis_unavailable(settings, error) from None
    finally:
        client.close()


def _describe_symbols(market: Market, symbols: list[str], settings: Settings) -> str:
    name = f"{market.upper()}_SYMBOLS"
    if not settings.symbols_all(market):
        return f"{name}: {', '.join(symbols)}"
    if not symbols:
        return f"{name}=ALL and `collector streams` has published no list yet"
    shown = ", ".join(symbols[:10]) + (f", ... ({len(symbols)} in all)" if len(symbols) > 10 else "")
    return f"{name}=ALL, now: {shown}"


def _cmd_fake_exchange(args: argparse.Namespace, settings: Settings) -> int:
    from collector.fake.server import main

    return main(args.fake_args)


def _cmd_services(args: argparse.Namespace, settings: Settings) -> int:
    from collector.local.services import services_command

    return services_command(args.action, args.dir)


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from collector.export import export, plan_export, summary_line

    plan = plan_export(
        args.relation, args.market, args.symbol, args.start, args.end, args.format, args.output
    )
    result = export(settings, plan, report=lambda line: print(line, file=sys.stderr, flush=True))
    print(summary_line(result), file=sys.stderr)
    return 0


def _cmd_book(args: argparse.Namespace, settings: Settings) -> int:
    from collector.book.command import run

    return run(settings, args.market, args.symbol, args.at, args.depth, args.json)


def _cmd_gaps(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import UTC, datetime

    from collector.db.connection import connect
    from collector.export.plan import parse_time
    from collector.gaps.report import DEFAULT_SINCE, format_gaps, read_gaps

    now = datetime.now(UTC)
    since = parse_time(args.since, "--since") if args.since else now - DEFAULT_SINCE
    conn = connect(settings)
    try:
        rows = read_gaps(conn, since, args.market, args.symbol.upper() if args.symbol else None)
    finally:
        conn.close()
    print(format_gaps(rows, now))
    return 0


def _cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import UTC, datetime, timedelta

    import redis

    from collector.audit import drained_balances, find_losses, format_audit, read_horizon
    from collector.db.connection import connect
    from collector.export.plan import parse_time
    from collector.queue import keys
    from collector.queue.batches import inflight_length, queue_length
    from collector.queue.client import redis_client, redis_unavailable
    from collector.queue.shards import present_lanes
    from collector.queue.spill_stats import read_pending

    now = datetime.now(UTC)
    since = parse_time(args.since, "--since") if args.since else now - timedelta(hours=24)
    check_services(settings, COMMAND_NEEDS["audit"])
    client = redis_client(settings)
    try:
        # Redis first: what is drained meanwhile then counts twice (never as lost), not zero times.
        queued = {_text(k): int(v) for k, v in client.hgetall(keys.AUDIT_QUEUED).items()}
        # Then the spill (every stream shard's), then the lists: what is fed back from disk meanwhile
        # counts twice, not zero times.
        spilled = read_pending(client)
        # Per queue shard: each shard numbers its own events, so each is balanced on its own.
        pending = {
            keys.shard_name(t, k): queue_length(client, t, (k,)) + inflight_length(client, t, (k,))
            for t, k in present_lanes(client, keys.TABLES, settings.queue_shards)
        }
    except redis.RedisError as error:
        raise redis_unavailable(settings, error) from None
    finally:
        client.close()
    conn = connect(settings)
    try:
        with conn.cursor() as cur:
            balances, losses = drained_balances(cur, since), find_losses(cur, since)
            horizon = read_horizon(cur, since, now)
            text = format_audit(balances, losses, queued, pending, horizon, spilled)
    finally:
        conn.close()
    print(text)
    return 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collector", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    streams = sub.add_parser(
        "streams", help="hold the Binance WebSocket connections and fill the Redis queues"
    )
    streams.add_argument(
        "--shard",
        metavar="I/N",
        help="record shard I of N (0-based; N processes share the symbols); overrides STREAM_SHARD",
    )
    sub.add_parser("web", help="serve /health and /metrics on WEB_PORT")
    sub.add_parser("flower", help="run Flower on FLOWER_PORT with basic auth from the settings")
    sub.add_parser(
        "init-db", help="create the database and tables, apply the TIMESCALE_* settings (idempotent)"
    )
    sub.add_parser("status", help="print connections, queues, drains and dead letters")
    trigger = sub.add_parser("trigger", help="run a task now through the Celery queue")
    trigger.add_argument("what", choices=["drain", "open-interest", "depth-snapshot", "alerts"])
    trigger.add_argument("--table", choices=TABLES)
    trigger.add_argument("--symbol")
    trigger.add_argument("--market", choices=["spot", "futures"])
    # No prefix characters: every argument, `--port` included, goes to the fake exchange's own parser
    # (argparse's REMAINDER alone rejects a leading option as unrecognized).
    fake = sub.add_parser(
        "fake-exchange", help="run the fake Binance exchange", add_help=False, prefix_chars="\0"
    )
    fake.add_argument("fake_args", nargs=argparse.REMAINDER)
    gaps = sub.add_parser("gaps", help="list depth gaps and stream outages with their durations")
    gaps.add_argument("--since", metavar="TIME", help="ISO 8601 (naive = UTC) or epoch ms; default 24 h ago")
    gaps.add_argument("--market", choices=["spot", "futures"])
    gaps.add_argument("--symbol", help="e.g. BTCUSDT (stream outages: the streams of that symbol)")
    audit = sub.add_parser(
        "audit", help="account for every event the stream process queued: drained, and lost in between"
    )
    audit.add_argument("--since", metavar="TIME", help="ISO 8601 (naive = UTC) or epoch ms; default 24 h ago")
    services = sub.add_parser("services", help="start/stop a local Redis and PostgreSQL (for make run)")
    services.add_argument("action", choices=["up", "down", "env"])
    services.add_argument("--dir", default="var")
    export = sub.add_parser(
        "export",
        help="write a table or view to CSV or Parquet (streamed, atomic)",
        description="Write the rows of a market table or aggregate view, in time order, to CSV or Parquet. "
        "The file appears under its name only when complete. Parquet types: timestamptz -> "
        "timestamp[us, UTC], bigint -> int64, boolean -> bool, numeric -> decimal128(38,18) "
        "(rounded to 18 decimals), text and jsonb -> string. CSV is PostgreSQL's: NULL is an empty "
        "field, booleans t/f, times in UTC.",
    )
    export.add_argument(
        "relation",
        metavar="TABLE_OR_VIEW",
        help="agg_trades, depth_updates, depth_snapshots, mark_prices, force_orders, open_interest, "
        "candles_1m, liquidations_1m, depth_gaps or stream_gaps",
    )
    export.add_argument("--market", choices=["spot", "futures"], help="futures-only tables take futures")
    export.add_argument("--symbol", help="e.g. BTCUSDT")
    time_help = "ISO 8601 date or date-time (naive = UTC) or epoch milliseconds"
    export.add_argument("--from", dest="start", metavar="TIME", help=f"inclusive; {time_help}")
    export.add_argument("--to", dest="end", metavar="TIME", help=f"exclusive; {time_help}")
    export.add_argument(
        "--format", choices=["csv", "parquet"], help="default: parquet for a .parquet file, else csv"
    )
    export.add_argument("-o", "--output", metavar="FILE", help="default or '-': standard output (CSV only)")
    book = sub.add_parser(
        "book",
        help="rebuild a symbol's order book at a time from the stored snapshots and diffs",
        description="Rebuild the order book at TIME from the last stored depth snapshot at or before it "
        "and the stored diffs after it, with Binance's sync rules for the market, and print the top "
        "levels. TIME is exchange time: a diff counts from its event time E, a snapshot from its E "
        "(futures) or else its receive time (spot). Exit 2 with one line when the stored rows do not "
        "pin the book at TIME: before any snapshot, inside a gap in the stored diffs, or after the "
        "last recorded event.",
    )
    book.add_argument("market", choices=["spot", "futures"], metavar="MARKET", help="spot or futures")
    book.add_argument("symbol", metavar="SYMBOL", help="e.g. BTCUSDT")
    book.add_argument("--at", required=True, metavar="TIME", help=time_help)
    book.add_argument("--depth", type=int, default=10, metavar="N", help="levels a side (default 10, 0: all)")
    book.add_argument(
        "--json",
        action="store_true",
        help="print JSON: market, symbol, at, as_of, last_update_id, snapshot {last_update_id, time}, "
        "diffs_applied, diffs_skipped, bids and asks ([[price, qty], ...])",
    )
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "streams": _cmd_streams,
    "web": _cmd_web,
    "flower": _cmd_flower,
    "init-db": _cmd_init_db,
    "status": _cmd_status,
    "trigger": _cmd_trigger,
    "fake-exchange": _cmd_fake_exchange,
    "services": _cmd_services,
    "gaps": _cmd_gaps,
    "audit": _cmd_audit,
    "export": _cmd_export,
    "book": _cmd_book,
}


# Commands an operator types in another shell while `make run` / `make demo` runs.
OPERATOR_COMMANDS = frozenset({"status", "trigger", "gaps", "audit", "book", "export"})


def _adopt_running_stack(command: str) -> str | None:
    """With no REDIS_URL / DATABASE_URL configured, talk to the stack running from ./var, and say so.

    Returns which stack that is, `NO_STACK` when none runs (the defaults are used), None when
    REDIS_URL / DATABASE_URL are configured or `command` is not an operator's.
    """
    from pathlib import Path

    from dotenv import dotenv_values

    from collector.local.stack import NO_STACK, running_stack

    if command not in OPERATOR_COMMANDS:
        return None
    configured = {**dotenv_values(".env"), **os.environ} if Path(".env").exists() else dict(os.environ)
    if "REDIS_URL" in configured or "DATABASE_URL" in configured:
        return None
    stack = running_stack(Path("var"))
    if stack is None:
        return NO_STACK
    label, env_file = stack
    for name, value in dotenv_values(env_file).items():
        if value is not None:
            os.environ.setdefault(name, value)
    print(f"collector: talking to the running `{label}` stack ({env_file})", file=sys.stderr)
    return f"the running `{label}` stack ({env_file})"


def _no_stack_hint(stack: str | None) -> str:
    """What a failed operator command says first when it only tried the defaults because no stack runs."""
    from collector.local.stack import NO_STACK

    return f"{NO_STACK}; " if stack == NO_STACK else ""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.stack = None
    if getattr(args, "shard", None) is not None:
        from collector.streams.shard import parse_shard

        try:
            # Through the environment, so the settings validate and carry it like STREAM_SHARD.
            os.environ["STREAM_SHARD"] = parse_shard(args.shard).label
        except ValueError as error:
            print(f"collector: --shard: {error}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        args.stack = _adopt_running_stack(args.command)
        settings = get_settings()
        _setup_logging(settings)
        if args.command not in CHECKED_BY_THE_COMMAND:
            check_services(settings, COMMAND_NEEDS[args.command])
        return COMMANDS[args.command](args, settings)
    except ConfigError as error:
        print(error_lines(error), file=sys.stderr)
        return EXIT_CONFIG
    except ServiceUnavailable as error:
        print(f"collector: {_no_stack_hint(args.stack)}{error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
