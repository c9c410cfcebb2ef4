"""Where streams go when the symbol list changes. Pure.

The rules follow Binance's connection limits (binance.md §1.2, §2, §7 #3, #4):
- a connection carries streams of one family only (spot; USD-M `/public` or `/market`: a stream on the
  wrong path is acknowledged and silent), and at most `per_connection` of them;
- a stream that stays is never moved: its connection is not touched, so its depth chain has no hole;
- removed streams are unsubscribed where they are; new ones fill the connections of their family that
  have room, in the order the connections were planned, and only then are new connections opened;
- a connection left with no stream is closed: it would receive nothing and be judged silent.
The SUBSCRIBE/UNSUBSCRIBE messages that carry a change to an open socket are
`collector.streams.subscriptions`' business.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from collector.binance.streams import ConnectionPlan, Family, StreamSpec, combined_url
from collector.settings import Market


@dataclass(frozen=True)
class Carried:
    """What one open connection carries now."""

    connection_id: str
    market: Market
    family: Family
    streams: tuple[str, ...]


@dataclass(frozen=True)
class Change:
    """One existing connection's new stream list (and the URL its next reconnection opens)."""

    connection_id: str
    streams: tuple[str, ...]
    url: str
    added: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True)
class Placement:
    """What to do: change these connections, open these, close these (after their streams are gone)."""

    changes: tuple[Change, ...] = ()
    opened: tuple[ConnectionPlan, ...] = ()
    closed: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.changes or self.opened or self.closed)


def connection_prefix(market: Market, family: Family) -> str:
    """The id prefix of a group's connections, as `collector.binance.streams.connection_plans` names them."""
    return "spot" if market == "spot" else f"futures-{family}"


def _next_id(prefix: str, taken: set[str]) -> str:
    index = 0
    while f"{prefix}-{index}" in taken:
        index += 1
    name = f"{prefix}-{index}"
    taken.add(name)
    return name


def plan_placement(
    carried: Sequence[Carried],
    wanted: Sequence[StreamSpec],
    per_connection: int,
    base_urls: Mapping[Market, str],
    taken_ids: Collection[str] = (),
    id_prefix: str = "",
) -> Placement:
    """Move from what `carried` holds to `wanted`, touching as little as the rules allow.

    `taken_ids` are ids used before in this process: a new connection never reuses one, so its
    counters cannot be confused with a closed connection's. `id_prefix` begins every new id (a
    shard's, `collector.streams.shard`). From nothing (`carried` empty) this is the start-up plan.
    """
    taken = {c.connection_id for c in carried} | set(taken_ids)
    wanted_by_group: dict[tuple[Market, Family], list[str]] = {}
    for spec in wanted:
        wanted_by_group.setdefault((spec.market, spec.family), []).append(spec.name)
    carried_by_group: dict[tuple[Market, Family], list[Carried]] = {}
    for connection in carried:
        carried_by_group.setdefault((connection.market, connection.family), []).append(connection)
    changes: list[Change] = []
    opened: list[ConnectionPlan] = []
    closed: list[str] = []
    for group in sorted({*wanted_by_group, *carried_by_group}):
        market, family = group
        names = list(dict.fromkeys(wanted_by_group.get(group, [])))
        wanted_set = set(names)
        connections = carried_by_group.get(group, [])
        already = {name for c in connections for name in c.streams}
        pending = [name for name in names if name not in already]
        base = base_urls[market]
        for connection in connections:
            kept = tuple(name for name in connection.streams if name in wanted_set)
            room = max(0, per_connection - len(kept))
            added, pending = tuple(pending[:room]), pending[room:]
            streams = kept + added
            removed = tuple(name for name in connection.streams if name not in wanted_set)
            if not streams:
                closed.append(connection.connection_id)
            elif added or removed:
                url = combined_url(base, family, streams)
                changes.append(Change(connection.connection_id, streams, url, added, removed))
        for index in range(0, len(pending), per_connection):
            chunk = tuple(pending[index : index + per_connection])
            connection_id = _next_id(id_prefix + connection_prefix(market, family), taken)
            url = combined_url(base, family, chunk)
            opened.append(ConnectionPlan(connection_id, market, family, url, chunk))
    return Placement(tuple(changes), tuple(opened), tuple(closed))
