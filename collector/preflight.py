"""Start-up checks: which services each entry point needs, and one line naming every one that is down.

An entry point that cannot do its job without Redis or PostgreSQL checks them before it starts, and
refuses with one line (`ServiceUnavailable`) naming each service that is down, its URL without the
password and what to do, instead of a library's traceback or a retry loop. Which services each needs:

- `collector streams`: Redis, where the queues are (once running, it keeps what it receives through
  a Redis outage and waits for it).
- `collector web`: neither; /health reports them (503 with the reason), after one warning at start.
- `collector status`: neither; its text reports each (UNHEALTHY, exit 1).
- `collector flower`, `collector trigger`: Redis, the broker.
- `collector init-db`: PostgreSQL (its server: the database may not exist yet).
- `collector gaps`, `export`, `book`: PostgreSQL, where the rows are.
- `collector audit`: both; it compares what was queued with what was stored.
- `collector fake-exchange`, `collector services`: neither.
- `celery -A collector worker`: Redis; PostgreSQL too unless it consumes only `rest` (drains write
  to it, the alert task reads it).
- `celery -A collector beat`: Redis.

A service that goes away later is the running process's business (one warning, retry): the stream
process keeps what it received, a drain keeps its batch, Celery reconnects to its broker.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from collector.errors import ServiceUnavailable
from collector.settings import Settings

Service = Literal["redis", "postgresql"]

COMMAND_NEEDS: dict[str, tuple[Service, ...]] = {
    "streams": ("redis",),
    "web": (),
    "flower": ("redis",),
    "init-db": ("postgresql",),
    "status": (),
    "trigger": ("redis",),
    "fake-exchange": (),
    "services": (),
    "gaps": ("postgresql",),
    "audit": ("redis", "postgresql"),
    "export": ("postgresql",),
    "book": ("postgresql",),
}

# Commands that check what they need themselves, at the right moment: `init-db` connects to the
# server's maintenance database first (its own may not exist yet); the operator commands check their
# arguments first, so a wrong option or time is named whatever the state of the services. `gaps`,
# `export` and `book` need no check of their own: connecting is their first use of PostgreSQL, and
# `collector.db.connection.connect` refuses in the same one line.
CHECKED_BY_THE_COMMAND = frozenset({"init-db", "trigger", "gaps", "audit", "export", "book"})

# Queues whose tasks use PostgreSQL: the drains write to it, the alert task reads from it. The REST
# tasks only call Binance and queue the answers in Redis.
POSTGRES_QUEUES = frozenset({"ingest", "alerts"})


def worker_queues(argv: Sequence[str]) -> frozenset[str] | None:
    """The queues `celery ... worker` was told to consume (`-Q a,b`, `-Qa`, `--queues[=]a`); None
    when it was not told, which means every queue. Pure."""
    queues: set[str] = set()
    told = False
    for index, arg in enumerate(argv):
        value: str | None = None
        if arg in ("-Q", "--queues"):
            value = argv[index + 1] if index + 1 < len(argv) else ""
        elif arg.startswith("--queues="):
            value = arg.partition("=")[2]
        elif arg.startswith("-Q"):
            value = arg[2:]
        if value is not None:
            told = True
            queues.update(name.strip() for name in value.split(",") if name.strip())
    return frozenset(queues) if told else None


def celery_needs(argv: Sequence[str]) -> tuple[Service, ...]:
    """What `celery -A collector <argv>` needs at start: Redis for a worker or beat, PostgreSQL too
    for a worker that takes drains or alerts. Pure."""
    if "worker" in argv:
        queues = worker_queues(argv)
        takes_postgres = queues is None or bool(queues & POSTGRES_QUEUES)
        return ("redis", "postgresql") if takes_postgres else ("redis",)
    if "beat" in argv:
        return ("redis",)
    return ()


def check_services(settings: Settings, needs: Iterable[Service]) -> None:
    """Raise `ServiceUnavailable` with one line naming every needed service that does not answer.

    Each is tried once, within its own timeout (REDIS_SOCKET_TIMEOUT_S, DATABASE_CONNECT_TIMEOUT_S).
    """
    from collector.db.connection import check_postgres
    from collector.queue.client import check_redis

    checks = {"redis": check_redis, "postgresql": check_postgres}
    problems = []
    for service in dict.fromkeys(needs):
        try:
            checks[service](settings)
        except ServiceUnavailable as error:
            problems.append(str(error))
    if problems:
        raise ServiceUnavailable("; ".join(problems))
