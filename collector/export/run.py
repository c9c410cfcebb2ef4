"""I/O part of `collector export`: a read-only session, COPY in worker threads, an atomic output file."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import BinaryIO, Final

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from collector.db.connection import connect
from collector.errors import ConfigError, ServiceUnavailable
from collector.export.plan import (
    Column,
    ExportPlan,
    Relation,
    copy_statement,
    no_rows_message,
    symbol_exists_sql,
)
from collector.settings import Settings

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S: Final = 2.0
WAIT_SLICE_S: Final = 0.2  # how often the supervising main thread wakes up to report progress
JOIN_TIMEOUT_S: Final = 10.0  # after a cancel; a worker still stuck in libpq is a daemon and dies with us
FILE_BUFFER_BYTES: Final = 2**20
PIPE_BYTES: Final = 2**20  # F_SETPIPE_SZ: fewer wake-ups between the COPY and the Parquet threads
EXIT_SIGTERM: Final = 128 + signal.SIGTERM

Report = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    rows: int
    bytes: int
    seconds: float
    output: Path | None  # None: standard output
    stdout_closed: bool = False  # the reader of standard output went away before the end


class CountingSink:
    """The file psycopg2's COPY writes into. COPY TO hands over one row per `write`, so rows are counted.

    With `hold_header`, the header line is written with the first row, or by `release()`: standard
    output cannot be taken back, and an export refused for having no rows must have written nothing.
    """

    __slots__ = ("_held", "_hold", "_write", "bytes", "rows")

    def __init__(self, file: BinaryIO, header: bool, hold_header: bool = False) -> None:
        self._write = file.write
        self._hold = header and hold_header
        self._held = b""
        self.rows = -1 if header else 0
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.rows += 1
        self.bytes += len(data)
        if self._hold:
            self._hold = False
            if self.rows == 0:  # the header line
                self._held = data
                return len(data)
        if self._held:
            self.release()
        return self._write(data)

    def release(self) -> None:
        """Write the header held back, if it still is."""
        held, self._held, self._hold = self._held, b"", False
        if held:
            self._write(held)


class _Worker(threading.Thread):
    """Runs `target`; records its failure in `failures` before `after` runs, so the root cause comes first."""

    def __init__(
        self,
        name: str,
        target: Callable[[], object],
        failures: list[BaseException],
        after: Callable[[], None],
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn, self._failures, self._after = target, failures, after

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as error:
            self._failures.append(error)
        finally:
            self._after()


def summary_line(result: ExportResult) -> str:
    rate = result.rows / result.seconds if result.seconds > 0 else 0.0
    where = "stdout" if result.output is None else str(result.output)
    closed = " (the reader closed it early)" if result.stdout_closed else ""
    return (
        f"export: {result.rows:,} rows, {result.bytes / 1e6:,.1f} MB in {result.seconds:.2f} s "
        f"({rate:,.0f} rows/s) -> {where}{closed}"
    )


def check_output(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"-o {path}: is a directory")
    if not path.parent.is_dir():
        raise ConfigError(f"-o {path}: directory {path.parent} does not exist")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary file beside `final` that takes its name only when the block ends without error.

    Any exception (Ctrl-C and SIGTERM included) removes it and leaves `final` as it was. There is
    no fsync: the guarantee is against interruption, not against a power cut.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    except OSError as error:
        raise ConfigError(f"-o {final}: cannot write in {final.parent}: {error.strerror}") from None
    temp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make exports private to their writer
        os.close(fd)
        yield temp
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) in the main thread, so every `finally` and cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(EXIT_SIGTERM)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def driver_errors_to_debug_log() -> Iterator[None]:
    """Keep psycopg2's stray error printout off stderr while the export runs.

    When the server ends the session during COPY TO, psycopg2 2.9 prints (PyErr_Print, which goes
    through sys.excepthook) a SystemError chained to the server's message, then raises
    OperationalError to the caller as well; that raised error is the one line the CLI prints.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if kind is SystemError and isinstance(value.__cause__, psycopg2.Error):
            logger.debug("export.driver_error %s", str(value.__cause__).strip())
        else:
            previous(kind, value, tb)

    sys.excepthook = hook
    try:
        yield
    finally:
        sys.excepthook = previous


def prepare_session(conn: Connection) -> None:
    """Read-only, and times rendered in UTC with ISO dates whatever the server's defaults are."""
    conn.set_session(readonly=True)
    with conn.cursor() as cur:
        cur.execute("SET TimeZone TO 'UTC'")
        cur.execute("SET DateStyle TO 'ISO, YMD'")


def read_columns(conn: Connection, relation: Relation) -> list[Column]:
    """The relation's columns and type names, from the catalog (views as well as tables)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
            " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped"
            " ORDER BY a.attnum",
            (sql.Identifier(relation.name).as_string(conn),),
        )
        columns = [Column(name, pg_type) for name, pg_type in cur.fetchall()]
    if not columns:
        raise ConfigError(f"{relation.name} does not exist in this database (run `collector init-db`)")
    return columns


def symbol_exists(conn: Connection, plan: ExportPlan) -> bool:
    with conn.cursor() as cur:
        cur.execute(symbol_exists_sql(plan))
        row = cur.fetchone()
    return bool(row and row[0])


def _one_line(error: BaseException, plan: ExportPlan) -> BaseException:
    """The failure of a worker as the error the CLI prints in one line."""
    if isinstance(error, psycopg2.OperationalError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else "connection lost"
        return ServiceUnavailable(f"PostgreSQL failed during the export: {first}")
    if isinstance(error, psycopg2.Error):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ConfigError(f"export of {plan.relation.name} failed: {first}")
    if isinstance(error, OSError) and not isinstance(error, BrokenPipeError):
        return ConfigError(f"cannot write {plan.output or 'stdout'}: {error.strerror or error}")
    return error


def _supervise(
    conn: Connection, workers: Sequence[_Worker], failures: list[BaseException], progress: Callable[[], None]
) -> None:
    """Start the workers and wait for them; on a failure, Ctrl-C or SIGTERM cancel the query and re-raise."""
    for worker in workers:
        worker.start()
    try:
        while not failures and any(w.is_alive() for w in workers):
            next(w for w in workers if w.is_alive()).join(WAIT_SLICE_S)
            progress()
    except BaseException:
        _stop(conn, workers)
        raise
    if failures:
        _stop(conn, workers)
        raise failures[0]


def _stop(conn: Connection, workers: Sequence[_Worker]) -> None:
    with suppress(psycopg2.Error):  # a broken connection has nothing left to cancel
        conn.cancel()  # PQcancel: safe from another thread while the COPY runs
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))


class _Progress:
    """A progress line at most every PROGRESS_INTERVAL_S, counting the rows COPY has handed over."""

    def __init__(self, sink: CountingSink, report: Report, started: float) -> None:
        self._sink, self._report, self._started = sink, report, started
        self._next = started + PROGRESS_INTERVAL_S

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + PROGRESS_INTERVAL_S
        rows = max(self._sink.rows, 0)
        self._report(f"export: {rows:,} rows, {rows / (now - self._started):,.0f} rows/s")


def _copy_target(conn: Connection, statement: str, sink: CountingSink) -> Callable[[], None]:
    def target() -> None:
        with conn.cursor() as cur:
            cur.copy_expert(statement, sink)

    return target


def _export_csv(conn: Connection, statement: str, sink: CountingSink, report: Report, started: float) -> int:
    """COPY … CSV HEADER straight into the sink's file; returns the rows."""
    failures: list[BaseException] = []
    worker = _Worker("export-copy", _copy_target(conn, statement, sink), failures, lambda: None)
    _supervise(conn, [worker], failures, _Progress(sink, report, started))
    return max(sink.rows, 0)


def _export_parquet(
    conn: Connection, statement: str, columns: list[Column], path: Path, report: Report, started: float
) -> int:
    """COPY … CSV into a pipe, read by pyarrow in a second thread that writes the Parquet file."""
    from collector.export.parquet import write_parquet

    read_fd, write_fd = os.pipe()
    set_pipe_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if set_pipe_size is not None:
        with suppress(OSError):  # only an optimisation (capped by /proc/sys/fs/pipe-max-size)
            fcntl.fcntl(write_fd, set_pipe_size, PIPE_BYTES)
    into_pipe = os.fdopen(write_fd, "wb", buffering=FILE_BUFFER_BYTES)
    from_pipe = os.fdopen(read_fd, "rb", buffering=FILE_BUFFER_BYTES)
    sink = CountingSink(into_pipe, header=False)
    copy = _copy_target(conn, statement, sink)

    def copy_then_close() -> None:
        copy()
        into_pipe.close()  # EOF for the reader; a flush error here is the copy's failure

    def quiet_close(file: BinaryIO) -> Callable[[], None]:
        def close() -> None:
            with suppress(OSError):
                file.close()

        return close

    failures: list[BaseException] = []
    written: list[int] = []
    workers = [
        _Worker("export-copy", copy_then_close, failures, quiet_close(into_pipe)),
        _Worker(
            "export-parquet",
            lambda: written.append(write_parquet(from_pipe, columns, str(path))),
            failures,
            quiet_close(from_pipe),
        ),
    ]
    _supervise(conn, workers, failures, _Progress(sink, report, started))
    if written[0] != sink.rows:  # cannot differ unless a row was lost between the threads
        raise ConfigError(f"parquet conversion lost rows: {sink.rows} copied, {written[0]} written")
    return sink.rows


def export(
    settings: Settings, plan: ExportPlan, report: Report, stdout: BinaryIO | None = None
) -> ExportResult:
    """Run the export `plan`; progress lines go to `report`. Failures raise one-line errors.

    The output file appears under its final name only when every row was written.
    """
    check_output(plan.output)
    started = time.monotonic()
    conn = connect(settings)
    try:
        with sigterm_as_exit(), driver_errors_to_debug_log():
            return _run(conn, plan, report, stdout or sys.stdout.buffer, started)
    except (psycopg2.Error, OSError) as error:
        raise _one_line(error, plan) from None
    finally:
        conn.close()


def _run(
    conn: Connection, plan: ExportPlan, report: Report, stdout: BinaryIO, started: float
) -> ExportResult:
    prepare_session(conn)
    columns = read_columns(conn, plan.relation)
    statement = copy_statement(plan, columns).as_string(conn)
    logger.debug("export.start relation=%s format=%s", plan.relation.name, plan.format)
    if plan.output is None:
        return _to_stdout(conn, plan, statement, stdout, report, started)
    with atomic_path(plan.output) as temp:
        if plan.format == "parquet":
            rows = _export_parquet(conn, statement, columns, temp, report, started)
        else:
            with temp.open("wb", buffering=FILE_BUFFER_BYTES) as file:
                rows = _export_csv(conn, statement, CountingSink(file, header=True), report, started)
        _check_symbol(conn, plan, rows)
        size = temp.stat().st_size
    return ExportResult(rows, size, time.monotonic() - started, plan.output)


def _to_stdout(
    conn: Connection, plan: ExportPlan, statement: str, stdout: BinaryIO, report: Report, started: float
) -> ExportResult:
    sink = CountingSink(stdout, header=True, hold_header=True)
    try:
        _export_csv(conn, statement, sink, report, started)
        _check_symbol(conn, plan, max(sink.rows, 0))  # before the header goes out: a refusal writes nothing
        sink.release()
        stdout.flush()
    except BrokenPipeError:
        # `collector export … | head`: the reader has what it wanted. Point stdout at /dev/null
        # so that the interpreter's final flush does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stdout.fileno())
        os.close(devnull)
        return ExportResult(max(sink.rows, 0), sink.bytes, time.monotonic() - started, None, True)
    return ExportResult(max(sink.rows, 0), sink.bytes, time.monotonic() - started, None)


def _check_symbol(conn: Connection, plan: ExportPlan, rows: int) -> None:
    """No rows and a symbol: a typo, unless the symbol has rows outside the window (0 rows is then right)."""
    if rows == 0 and plan.symbol is not None and not symbol_exists(conn, plan):
        raise ConfigError(no_rows_message(plan))
