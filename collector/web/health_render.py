"""Health rendering: the JSON body of `/health`. Pure.

(`collector status` renders the same facts as text: `collector.web.status`.)
"""

from __future__ import annotations

from typing import Any

from collector.web.health_facts import HealthSnapshot, age_s


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _backlog(snap: HealthSnapshot, now: int) -> dict[str, Any]:
    """What waits to be stored (Redis lists, in flight, spilled to disk) and the time to drain it."""
    backlog, spill = snap.backlog, snap.spill
    return {
        "total": backlog.total,
        "queued": backlog.queued,
        "in_flight": backlog.in_flight,
        "spilled": backlog.spilled,
        "spill_bytes": backlog.spill_bytes,
        "spill_segments": spill.segments if spill else 0,
        "spilling": bool(spill and spill.spilling),
        "oldest_spill_age_s": _rounded(age_s(spill.oldest_us, now)) if spill else None,
        "queue_bytes": spill.queue_bytes if spill else None,
        "queue_cap_bytes": spill.cap_bytes if spill else None,
        "spill_disk_free_bytes": spill.disk_free_bytes if spill else None,
        "drain_rate_per_s": _rounded(backlog.drain_rate),
        "eta_s": _rounded(backlog.eta_s),
        "figures_age_s": _rounded(age_s(spill.updated_us, now)) if spill else None,
    }


def health_json(snap: HealthSnapshot, now: int, reasons: list[str]) -> dict[str, Any]:
    """The body of `/health`: the verdict, then every fact with its age at `now` (µs)."""
    return {
        "healthy": not reasons,
        "reasons": reasons,
        "checked_at_us": now,
        "redis": {"up": snap.redis_up, "error": snap.redis_error},
        "postgres": {"up": snap.postgres_up, "error": snap.postgres_error, "database": snap.database},
        "stream_processes": [
            {
                "shard": r.label,
                "state": r.state,
                "heartbeat_age_s": _rounded(age_s(r.alive_us or None, now)),
                "host": r.host,
                "pid": r.pid,
                "run": r.run,
                "loop_block_max_ms": lag.max_block_ms if (lag := snap.loop_lags.get(r.label)) else None,
            }
            for r in snap.shards
        ],
        "connections": [
            {
                "connection_id": c.connection_id,
                "market": c.market,
                "family": c.family,
                "state": c.state,
                "streams": list(c.streams),
                "connected_for_s": _rounded(age_s(c.connected_since_us, now)),
                "last_message_age_s": _rounded(age_s(c.last_message_us, now)),
                "messages": c.messages,
                "reconnects": c.reconnects,
                "last_error": c.last_error,
            }
            for c in snap.connections
        ],
        "streams": [
            {
                "market": s.market,
                "stream": s.stream,
                "messages": s.messages,
                "last_message_age_s": _rounded(age_s(s.last_message_us, now)),
            }
            for s in snap.streams
        ],
        "tables": [
            {
                "table": t.table,
                "queue_length": t.queue_length,
                "inflight_length": t.inflight_length,
                "last_drain_age_s": _rounded(age_s(t.last_drain_us, now)),
            }
            for t in snap.tables
        ],
        "deadletter_length": snap.deadletter_length,
        "drain_loops": snap.drain_loops,
        "backlog": _backlog(snap, now),
        "lost_events": [
            {
                "table": loss.table,
                "count": loss.count,
                "received_after": loss.after_received.isoformat(),
                "received_before": loss.before_received.isoformat(),
            }
            for loss in snap.losses
        ],
        "open_gaps": [
            {
                "kind": g.kind,
                "market": g.market,
                "name": g.name,
                "cause": g.cause,
                "open_for_s": _rounded(age_s(g.since_us, now)),
            }
            for g in snap.open_gaps
        ],
        "counters": {
            name: {"|".join(labels): value for labels, value in sorted(values.items())}
            for name, values in snap.counters.items()
        },
    }
