"""The one typed settings object, read once from the environment and an optional `.env`.

Every tunable carries its unit in its name (`_S` seconds, `_MS` milliseconds, `_USD` dollars).
`load_settings()` turns bad values into a `ConfigError` with one line per bad variable, naming it
(every one at once, not the first only), so the CLI can print them and exit without a traceback.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from collector.errors import ConfigError

Market = Literal["spot", "futures"]

# Binance symbols are upper-case letters and digits; USD-M quarterlies add `_YYMMDD`.
SYMBOL_PATTERN = re.compile(r"^[A-Z0-9]{2,20}(_[0-9]{6})?$")

# Stream types a user may list in SPOT_STREAMS / FUTURES_STREAMS. The exact wire names are built
# in `collector.binance.streams`; anything else is refused at start, because Binance acknowledges a
# bad name and then sends nothing (binance.md §0 fact 3), which looks exactly like a quiet market.
SPOT_STREAM_TYPES = frozenset({"aggTrade", "depth", "depth@100ms", "depth@500ms", "depth@1000ms"})
FUTURES_STREAM_TYPES = frozenset(
    {
        "aggTrade",
        "depth",
        "depth@100ms",
        "depth@250ms",
        "depth@500ms",
        "markPrice",
        "markPrice@1s",
        "markPrice@arr",
        "markPrice@arr@1s",
        "forceOrder",
        "forceOrder@symbol",
    }
)
# Valid `limit` values of GET /fapi/v1/depth; any other answers -4021 (binance.md §4.2).
FUTURES_DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)
SPOT_DEPTH_LIMIT_MAX = 5000  # GET /api/v3/depth caps at 5000 levels (binance.md §4.1)

# `*_SYMBOLS=ALL`: every TRADING symbol of the market's exchangeInfo (collector.binance.exchange_info).
ALL_SYMBOLS = "ALL"
ASSET_PATTERN = re.compile(r"^[A-Z0-9]{2,12}$")


# The schemes redis-py's `from_url` reads; `celeryconfig` spells `unix://` the way kombu reads it.
REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_redis_url(url: str) -> None:
    """`ValueError` with the reason when `url` is not a Redis URL that redis-py and kombu read alike.

    redis-py alone would take `redis://host/abc` as database 0 and kombu refuse it; a scheme or port
    that either refuses would otherwise surface as a traceback from whichever connects first.
    """
    scheme, found, _ = url.partition("://")
    if not found or scheme not in REDIS_SCHEMES:
        raise ValueError(
            "not a Redis URL; expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///PATH?db=DB"
        )
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if scheme == "unix":
        if parts.path in ("", "/"):
            raise ValueError("no socket path; expected unix:///PATH?db=DB")
        database = query.get("db", ["0"])[-1]
    else:
        if not parts.hostname:
            raise ValueError(f"no host; expected {scheme}://HOST:PORT/DB")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:  # redis-py reads port 0 as "no port" and goes to 6379
            raise ValueError("the port is not a number from 1 to 65535")
        if "db" in query:  # redis-py would read it, kombu not: the database goes in the path
            raise ValueError(f"the database goes in the path ({scheme}://HOST:PORT/DB), not in ?db=")
        database = parts.path.removeprefix("/") or "0"
    if not database.isdigit():
        raise ValueError(f"the database {database!r} is not a number (0, 1, ...)")


def check_database_url(url: str) -> None:
    """`ValueError` with the reason when `url` is not a PostgreSQL URL naming a database."""
    scheme, found, _ = url.partition("://")
    # SQLAlchemy-style URLs (`postgresql+psycopg2://`) are accepted too.
    if not found or scheme.partition("+")[0] not in ("postgresql", "postgres"):
        raise ValueError("not a PostgreSQL URL; expected postgresql://USER@HOST:PORT/DATABASE")
    if not urlsplit(url).path.removeprefix("/"):
        raise ValueError("no database name; expected postgresql://USER@HOST:PORT/DATABASE")


def redacted_url(url: str) -> str:
    """`url` with its password, if any, replaced by `***`: fit for a log line or an error message."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}"))


# The error type of a check whose message already shows what it refuses: no "(got …)" after it.
_SELF_DESCRIBED = "collector_setting"


def _refuse(message: str) -> PydanticCustomError:
    """A validation error whose message is printed as it is, after the variable's name."""
    return PydanticCustomError(_SELF_DESCRIBED, "{problem}", {"problem": message})


def _split_comma_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything the collector can be told. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- services -------------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/collector"
    redis_socket_timeout_s: float = Field(5.0, gt=0)
    database_connect_timeout_s: int = Field(5, gt=0)

    # --- Binance endpoints ----------------------------------------------------------------------
    binance_spot_ws_url: str = "wss://stream.binance.com:9443"
    binance_futures_ws_url: str = "wss://fstream.binance.com"
    binance_spot_rest_url: str = "https://api.binance.com"
    binance_futures_rest_url: str = "https://fapi.binance.com"

    # --- what to record -------------------------------------------------------------------------
    spot_symbols: Annotated[list[str], NoDecode] = ["BTCUSDT", "ETHUSDT"]
    futures_symbols: Annotated[list[str], NoDecode] = ["BTCUSDT", "ETHUSDT"]
    spot_streams: Annotated[list[str], NoDecode] = ["aggTrade", "depth@500ms"]
    futures_streams: Annotated[list[str], NoDecode] = [
        "aggTrade",
        "depth@500ms",
        "markPrice@arr@1s",
        "forceOrder",
    ]
    # With `*_SYMBOLS=ALL`: keep only symbols quoted in these assets (empty = every quote asset),
    # and look at exchangeInfo again this often for new listings and delistings.
    spot_quote_assets: Annotated[list[str], NoDecode] = []
    futures_quote_assets: Annotated[list[str], NoDecode] = []
    symbols_refresh_interval_s: float = Field(600, gt=0)
    # Since 2026-06-30 the all-market futures streams also carry COIN-M rows (`st` == 2).
    keep_coin_m_rows: bool = False

    # --- REST polling ---------------------------------------------------------------------------
    open_interest_interval_s: float = Field(60, gt=0)
    depth_snapshot_interval_s: float = Field(300, gt=0)
    depth_snapshot_limit: int = Field(1000, gt=0)
    rest_connect_timeout_s: float = Field(3.05, gt=0)
    rest_read_timeout_s: float = Field(10, gt=0)
    rest_max_retries: int = Field(4, ge=0)
    rest_backoff_initial_s: float = Field(0.5, gt=0)
    rest_backoff_max_s: float = Field(30, gt=0)
    # Share of each market's per-minute request weight kept unused, for other users of this IP and
    # for clock skew between us and Binance's minute (collector.rest.budget).
    rest_weight_margin: float = Field(0.1, ge=0, lt=0.5)
    # Scheduled REST calls sent at once by one poll tick (each on its own connection).
    rest_parallel_requests: int = Field(4, gt=0, le=32)

    # --- liquidation alerts ---------------------------------------------------------------------
    alert_log: Path = Path("alert.log")
    alert_min_notional_usd: float = Field(100_000, gt=0)
    alert_window_s: float = Field(60, gt=0)
    alert_window_notional_usd: float = Field(1_000_000, gt=0)
    alert_cooldown_s: float = Field(300, ge=0)
    alert_interval_s: float = Field(1, gt=0)
    alert_batch_max_rows: int = Field(5000, gt=0)

    # --- stream process -------------------------------------------------------------------------
    stream_flush_interval_ms: int = Field(50, gt=0)
    stream_flush_max_events: int = Field(2000, gt=0)
    stream_buffer_warn_events: int = Field(1_000_000, gt=0)
    # While Redis is unreachable, past this many buffered events they go to SPILL_DIR (~40 MB at
    # ~400 bytes each): the stream process's memory stays flat through an outage of any length.
    stream_buffer_max_events: int = Field(100_000, gt=0)
    # --- backpressure (collector.streams.pressure) -------------------------------------------------
    # What the Redis queues may hold (estimated: length x mean envelope size); past it the stream
    # process spills to SPILL_DIR, and feeds it back once they are below 80 % of it. 512 MiB is about
    # 30 s of all of Binance (50k msg/s) and hours at a few symbols, on a machine with 2-4 GB of RAM.
    redis_max_queue_bytes: int = Field(512 * 1024 * 1024, gt=0)
    # Local disk for the spill; one directory per stream process (it is locked while in use): a
    # stream shard i/n with n > 1 uses SPILL_DIR/shard-<i>of<n>, so shards on one host share the setting.
    spill_dir: Path = Path("var/spill")
    ws_open_timeout_s: float = Field(10, gt=0)
    ws_idle_timeout_s: float = Field(300, gt=0)  # the longest silence tolerated on any connection
    # A busy connection is silent after 50 of its usual gaps between frames, but never sooner than this.
    ws_silence_min_s: float = Field(5, gt=0)
    # Replace each connection (make-before-break) before Binance's 24-hour cut (binance.md §2).
    ws_rotate_after_s: float = Field(85_800, gt=0, le=86_400)
    ws_backoff_initial_s: float = Field(1, gt=0)
    ws_backoff_max_s: float = Field(60, gt=0)
    ws_max_streams_per_connection: int = Field(200, gt=0, le=1024)
    # `i/n`: this stream process records shard i of n (collector.streams.shard); `collector streams
    # --shard` overrides it. 0/1 records everything.
    stream_shard: str = "0/1"
    # Run the stream process on uvloop when it is installed (bench/stream_throughput.py measures it).
    stream_uvloop: bool = False

    # --- drain (Redis -> PostgreSQL) ------------------------------------------------------------
    # How often beat makes sure DRAIN_LOOPS drain loops run (a loop drains continuously in between).
    drain_interval_s: float = Field(1, gt=0)
    drain_batch_max_rows: int = Field(5000, gt=0, le=7000)
    drain_run_max_s: float = Field(20, gt=0)  # one `collector trigger drain` run
    drain_lock_ttl_s: int = Field(30, gt=0)
    # Drain loops running at once over every worker and host: keep it below the ingest pool's
    # concurrency (the Procfile's 3), so the alert task always finds a free pool process.
    drain_loops: int = Field(2, gt=0, le=64)
    # A loop hands over to a fresh task after this long (well inside the broker's visibility timeout).
    drain_loop_max_s: float = Field(300, gt=0, le=600)
    # An idle loop waits on Redis this long for a wake-up before it looks at every queue again.
    drain_idle_wait_s: float = Field(1, gt=0, le=30)
    # Lists per table queue; a symbol's events always go to the same one (1: the names of before).
    queue_shards: int = Field(1, gt=0, le=64)

    # --- TimescaleDB ---------------------------------------------------------------------------
    # auto: hypertables when the server can load the extension, plain tables otherwise (with a
    # warning naming the fix); require: refuse to run init-db without it; off: plain tables always.
    timescale: Literal["auto", "require", "off"] = "auto"
    timescale_chunk_interval_h: int = Field(24, gt=0)  # applies to chunks created after a change
    timescale_compress_after_days: int = Field(7, ge=0)  # 0 = never compress
    timescale_retention_days: int = Field(0, ge=0)  # 0 = keep forever
    # Continuous aggregates (candles_1m, liquidations_1m): how often the refresh policy runs and how
    # far back it looks for late rows; newer buckets are computed at query time (real-time aggregation).
    timescale_aggregate_refresh_interval_s: int = Field(60, gt=0)
    timescale_aggregate_lookback_h: int = Field(24, gt=0)

    # --- monitoring -----------------------------------------------------------------------------
    web_host: str = "0.0.0.0"
    web_port: int = Field(8000, gt=0, lt=65536)
    health_max_message_age_s: float = Field(60, gt=0)
    health_max_drain_age_s: float = Field(30, gt=0)
    health_max_gap_open_s: float = Field(120, gt=0)
    flower_host: str = "127.0.0.1"  # a public address needs a FLOWER_PASSWORD of your own
    flower_port: int = Field(5555, gt=0, lt=65536)
    flower_user: str = "admin"
    flower_password: SecretStr = SecretStr("change-me")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        check_redis_url(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        check_database_url(value)
        return value

    @field_validator("spot_symbols", "futures_symbols", mode="before")
    @classmethod
    def _parse_symbols(cls, value: object) -> object:
        items = _split_comma_list(value)
        if isinstance(items, list):
            items = [str(item).upper() for item in items]
            for symbol in items:
                if not SYMBOL_PATTERN.match(symbol):
                    raise ValueError(f"{symbol!r} is not a Binance symbol (letters and digits, e.g. BTCUSDT)")
            if not items:
                raise ValueError("the list is empty")
            if ALL_SYMBOLS in items and len(items) > 1:
                raise ValueError(f"{ALL_SYMBOLS} stands alone (every TRADING symbol), not in a list")
        return items

    @field_validator("spot_quote_assets", "futures_quote_assets", mode="before")
    @classmethod
    def _parse_assets(cls, value: object) -> object:
        items = _split_comma_list(value)
        if isinstance(items, list):
            items = [str(item).upper() for item in items]
            for asset in items:
                if not ASSET_PATTERN.match(asset):
                    raise ValueError(f"{asset!r} is not an asset (letters and digits, e.g. USDT)")
        return items

    @field_validator("spot_streams", "futures_streams", mode="before")
    @classmethod
    def _parse_streams(cls, value: object) -> object:
        return _split_comma_list(value)

    # The checks below look at one variable each (several read another, already validated, through
    # `info.data`), so a ValidationError lists every bad variable, not only the first.

    @field_validator("spot_streams", "futures_streams")
    @classmethod
    def _check_stream_types(cls, value: list[str], info: ValidationInfo) -> list[str]:
        allowed = SPOT_STREAM_TYPES if info.field_name == "spot_streams" else FUTURES_STREAM_TYPES
        for stream in value:
            if stream not in allowed:
                raise _refuse(f"unknown stream type {stream!r} (known: {', '.join(sorted(allowed))})")
        return value

    @field_validator("spot_quote_assets", "futures_quote_assets")
    @classmethod
    def _quote_assets_need_all(cls, value: list[str], info: ValidationInfo) -> list[str]:
        market = "spot" if info.field_name == "spot_quote_assets" else "futures"
        symbols = info.data.get(f"{market}_symbols")  # absent when that variable is bad itself
        if value and symbols is not None and symbols != [ALL_SYMBOLS]:
            # A filter that silently did nothing would look like a recording of those symbols.
            raise _refuse(
                f"only applies with {market.upper()}_SYMBOLS=ALL "
                f"(got {market.upper()}_SYMBOLS={','.join(symbols)})"
            )
        return value

    @field_validator("stream_shard")
    @classmethod
    def _check_shard(cls, value: str) -> str:
        from collector.streams.shard import parse_shard  # it imports these settings' module

        try:
            return parse_shard(value).label
        except ValueError as error:
            raise _refuse(str(error)) from None

    @field_validator("depth_snapshot_limit")
    @classmethod
    def _check_depth_limit(cls, value: int, info: ValidationInfo) -> int:
        if value not in FUTURES_DEPTH_LIMITS and info.data.get("futures_symbols", True):
            raise _refuse(
                f"{value} is not a futures depth limit (one of {', '.join(map(str, FUTURES_DEPTH_LIMITS))})"
            )
        if value > SPOT_DEPTH_LIMIT_MAX:
            raise _refuse(f"at most {SPOT_DEPTH_LIMIT_MAX} (got {value})")
        return value

    @field_validator("drain_idle_wait_s")
    @classmethod
    def _wait_within_the_slot(cls, value: float, info: ValidationInfo) -> float:
        # An idle loop renews its slot (collector.queue.loops) between waits: a wait as long as the
        # slot's life would lose the slot every time it waited in vain.
        ttl = info.data.get("drain_lock_ttl_s")
        if ttl and value * 2 > ttl:
            raise _refuse(f"{value:g} s must be at most half DRAIN_LOCK_TTL_S ({ttl} s)")
        return value

    @field_validator("timescale_aggregate_lookback_h")
    @classmethod
    def _lookback_within_retention(cls, value: int, info: ValidationInfo) -> int:
        # A refresh window reaching into chunks that retention already dropped would empty those
        # buckets of the aggregates (TimescaleDB docs, "Data retention with continuous aggregates").
        retention = info.data.get("timescale_retention_days")
        if retention and value >= 24 * retention:
            raise _refuse(f"{value} h must be shorter than TIMESCALE_RETENTION_DAYS ({retention} days)")
        return value

    def symbols(self, market: Market) -> list[str]:
        return self.spot_symbols if market == "spot" else self.futures_symbols

    def symbols_all(self, market: Market) -> bool:
        """True when `market` records every TRADING symbol of exchangeInfo (`*_SYMBOLS=ALL`)."""
        return self.symbols(market) == [ALL_SYMBOLS]

    def quote_assets(self, market: Market) -> list[str]:
        """The quote-asset filter of an ALL market (`*_QUOTE_ASSETS`); empty = every quote asset."""
        return self.spot_quote_assets if market == "spot" else self.futures_quote_assets


def _describe(error: ValidationError) -> list[str]:
    """One line per bad variable, naming it and why, from pydantic's error list."""
    lines: dict[str, str] = {}
    for problem in error.errors():
        location = [str(part) for part in problem.get("loc", ()) if part not in ("__root__",)]
        message = str(problem.get("msg", "invalid value")).removeprefix("Value error, ")
        if not location:
            lines.setdefault(message, message)
            continue
        name = location[0].upper()
        if problem.get("type") != _SELF_DESCRIBED:
            value = problem.get("input")
            if location[0] in ("redis_url", "database_url") and isinstance(value, str):
                value = redacted_url(value)  # a password is no part of an error message
            message = f"{message} (got {value!r})"
        lines.setdefault(name, f"{name}: {message}")  # the first reason for each variable
    return list(lines.values())


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; raise `ConfigError` with one line per bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        lines = [f"configuration error: {line}" for line in _describe(error)]
        raise ConfigError("\n".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
