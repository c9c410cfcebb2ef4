"""The alert log (ALERT_LOG): one line per alert, appended at most once and made durable.

Exactly-once across crashes: the caller marks an alert published in PostgreSQL only after the line
is on disk, and before appending we look for the alert's key in the file's tail. A task killed
between the write and the database update therefore finds its line on the retry and does not
write it again. Only one alert evaluation runs at a time (the Redis lock), and pending alerts are
written in id order, so a line left by a crash is always within the tail when it is looked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

TAIL_BYTES: Final = 64 * 1024


def _marker(alert_key: str) -> bytes:
    # The key ends the line, so " key=<k>\n" cannot match a longer key that starts with <k>.
    return b" key=" + alert_key.encode() + b"\n"


def read_tail(path: Path, size: int = TAIL_BYTES) -> bytes:
    """The last `size` bytes of the file (all of it when shorter); empty when there is no file."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            handle.seek(max(0, end - size))
            return handle.read()
    except FileNotFoundError:
        return b""


def contains(path: Path, alert_key: str) -> bool:
    """True when the alert's line is already among the file's last TAIL_BYTES bytes."""
    return _marker(alert_key) in read_tail(path)


def append_once(path: Path, alert_key: str, line: str) -> bool:
    """Append `line` (which must end with ` key=<alert_key>`) unless it is already there; fsync it.

    Returns True when the line was written now, False when an earlier run had written it.
    """
    if not line.endswith(f" key={alert_key}") or "\n" in line:
        raise ValueError("an alert line is one line ending with ' key=<alert_key>'")
    tail = read_tail(path)
    if _marker(alert_key) in tail:
        return False
    data = line.encode() + b"\n"
    if tail and not tail.endswith(b"\n"):
        data = b"\n" + data  # a torn line from a crash must not swallow this one
    created = not path.exists()
    if created:
        path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    """Make a newly created file's directory entry durable too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
