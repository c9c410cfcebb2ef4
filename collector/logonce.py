"""Log a service's changes of state, not its state on every attempt: one line when it becomes
unreachable, one when it is back (an operator reads two lines, not one a second)."""

from __future__ import annotations

import logging


class Transitions:
    """Remembers whether `name` was last seen up; logs only the changes."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, name: str) -> None:  # type: ignore[type-arg]
        self._logger = logger
        self.name = name
        self.up: bool | None = None

    def report(self, up: bool, error: object = None) -> None:
        if up and self.up is False:
            self._logger.info("%s_back", self.name)
        elif not up and self.up is not False:
            self._logger.warning("%s_unreachable error=%s (logged once until it is back)", self.name, error)
        self.up = up
