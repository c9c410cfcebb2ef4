"""The gap ledger: what the collector did NOT receive, recorded as carefully as what it did.

`records` (the queued record formats), `rows` (the gap tables' rows, read back from those records),
`depth` (diff-depth sequence checks and per-symbol resync bookkeeping, pure), `report` (`collector gaps`).
"""
