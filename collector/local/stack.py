"""Which local stack (`make run` or `make demo`, started by scripts/stack.sh) runs from this checkout.

The facts the operator commands share: the CLI adopts the running stack's env file, `collector
services env` prints its URLs, and `collector status` says `NO_STACK` when none runs. Reads pid files
only; it starts nothing (that is `collector.local.servers` and `collector.local.services`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final


def pid_alive(pid: int) -> bool:
    """True when `pid` runs (a zombie left by a parent that never reaps it does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user (the postgres system user)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def pid_from_file(path: Path) -> int | None:
    """The pid on the first line of a pid file, or None when there is none."""
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


# The stacks `scripts/stack.sh` starts: (what the user typed, the name of its pid and env files).
STACKS: Final = (("make run", "run"), ("make demo", "demo"))
# What operator commands say when neither runs and nothing is configured (they use the defaults).
NO_STACK: Final = "no local stack running (make run / make demo)"


def running_stack(root: Path) -> tuple[str, Path] | None:
    """The `make run` / `make demo` stack running from `root` (its honcho pid is alive): its name
    and the env file its processes use, or None."""
    for label, name in STACKS:
        pid = pid_from_file(root / f"{name}.pid")
        env_file = root / f"{name}.env"
        if pid is not None and pid_alive(pid) and env_file.exists():
            return label, env_file
    return None
