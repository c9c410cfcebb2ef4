"""Wait until 127.0.0.1:PORT accepts connections, then become the given command (exec, same pid).

`make demo` (Procfile.demo) starts the stream process this way: honcho starts every process at once,
and without the wait its first connections found the fake exchange not yet listening
(`ws.connect_failed ... ConnectionRefusedError`, then a reconnect). `make run` does not use it.

    python scripts/wait_for_port.py 19443 -- collector streams

Past `--timeout-s` the command starts anyway, after one line on stderr: it has its own retries.
"""

from __future__ import annotations

import argparse
import os
import sys

from collector.local.servers import wait_for_port


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], usage="%(prog)s PORT [--timeout-s S] -- COMMAND..."
    )
    parser.add_argument("port", type=int)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        parser.error("no command after --")
    split = argv.index("--")
    args, command = parser.parse_args(argv[:split]), argv[split + 1 :]
    try:
        wait_for_port(args.port, args.timeout_s)
    except TimeoutError as error:
        print(f"wait_for_port: {error}; starting {command[0]} anyway", file=sys.stderr)
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
