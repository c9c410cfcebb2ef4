"""`honcho start` for scripts/stack.sh, with a stop grace of our own and every process's log in files.

    python scripts/run_procfile.py --kill-wait 30 --log-dir var/log -- start -f Procfile -e .env

Each line a process writes still reaches the terminal exactly as honcho prints it (colours and all),
and also `<log dir>/<process>.log` (`streams.log`, `worker-ingest.log`...; honcho's own lines, such
as "streams.1 started (pid=...)" and the signals it sends at a stop, go to `honcho.log` with a
timestamp). Writing from honcho's printer rather than from each process's logging setup keeps every
line: Celery's own, prints, tracebacks of a crash, and the last lines of a stop. Each file is rotated
by size by logging.handlers.RotatingFileHandler (`streams.log.1` ... `streams.log.N`), so the space
they take is bounded; a line is written to its file before the terminal, so a terminal that went
away does not cost the file its line.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

import honcho.command
import honcho.manager
from honcho.printer import Message, Printer

SYSTEM_NAME = "system"  # honcho.manager.SYSTEM_PRINTER_NAME: the name of honcho's own lines
HONCHO_LOG = "honcho"


def log_name(process: str | None) -> str:
    """The file a process's lines go to: `streams.1` -> `streams` (honcho numbers the copies of a
    process, and the Procfiles run one of each), `system` -> `honcho`."""
    if not process or process == SYSTEM_NAME:
        return HONCHO_LOG
    base, _, number = process.rpartition(".")
    return base if base and number == "1" else process


def file_lines(message: Message) -> list[str]:
    """The lines of one honcho message as they go to its file: the process's own text unchanged
    (its logging carries the time), honcho's lines behind a date and time."""
    data = message.data
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    if log_name(message.name) != HONCHO_LOG:
        return text.splitlines()
    return [f"{message.time:%Y-%m-%d %H:%M:%S} {line}" for line in text.splitlines()]


class FilePrinter(Printer):  # type: ignore[misc]  # honcho has no type hints
    """honcho's Printer that also appends each line to its process's rotated log file."""

    def __init__(self, *args: Any, log_dir: Path, max_bytes: int, backups: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._log_dir = log_dir
        self._max_bytes = max_bytes
        self._backups = backups
        self._files: dict[str, RotatingFileHandler] = {}

    def write(self, message: Message) -> None:
        if message.type == "line":
            handler = self._file(log_name(message.name))
            for line in file_lines(message):
                # args=None: the text is never %-formatted, whatever it holds.
                handler.handle(logging.makeLogRecord({"msg": line, "args": None}))
        super().write(message)

    def _file(self, name: str) -> RotatingFileHandler:
        handler = self._files.get(name)
        if handler is None:
            handler = RotatingFileHandler(
                self._log_dir / f"{name}.log",
                maxBytes=self._max_bytes,
                backupCount=self._backups,
                encoding="utf-8",
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._files[name] = handler
        return handler


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kill-wait", type=int, required=True, help="seconds from SIGTERM to SIGKILL")
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("--log-max-bytes", type=int, default=10 * 1024 * 1024, help="rotate past this size")
    parser.add_argument("--log-backups", type=int, default=5, help="rotated files kept per process")
    parser.add_argument("honcho", nargs=argparse.REMAINDER, help="-- and honcho's own arguments")
    args = parser.parse_args(argv)
    if args.log_max_bytes <= 0 or args.log_backups <= 0:
        # RotatingFileHandler never rotates with either at 0: the files would grow without bound.
        parser.error("--log-max-bytes and --log-backups must be positive")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    # honcho sends SIGTERM to every process, then SIGKILL after KILL_WAIT seconds (its default is 5).
    honcho.manager.KILL_WAIT = args.kill_wait
    honcho.command.Printer = functools.partial(  # the printer honcho.command.command_start builds
        FilePrinter, log_dir=args.log_dir, max_bytes=args.log_max_bytes, backups=args.log_backups
    )
    honcho.command.main(args.honcho[1:] if args.honcho[:1] == ["--"] else args.honcho)


if __name__ == "__main__":
    main(sys.argv[1:])
