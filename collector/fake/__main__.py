"""`python -m collector.fake`: run the fake Binance exchange in the foreground."""

from __future__ import annotations

import sys

from collector.fake.server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
