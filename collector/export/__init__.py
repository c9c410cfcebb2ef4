"""`collector export`: stream a market table or aggregate view to CSV or Parquet in flat memory.

Rows come in time order (`ORDER BY` the relation's time column; ties in no set order), filtered by
`--market`, `--symbol` and the half-open window `--from` (inclusive) .. `--to` (exclusive). Times
are ISO 8601 dates or date-times (naive means UTC) or epoch milliseconds; the session runs in UTC.

- CSV: PostgreSQL's own `COPY … TO STDOUT (FORMAT csv, HEADER)`, streamed to the file or stdout.
  NULL is an empty field, an empty string is `""`, booleans are `t`/`f`, timestamps read
  `2025-11-24 16:00:00.123+00`, numerics keep their exact text.
- Parquet: the same COPY through a pipe into `pyarrow.csv`, written with zstd in row groups of about
  16 MiB of Arrow data. Types: timestamptz -> timestamp[us, tz=UTC]; bigint -> int64; boolean -> bool;
  numeric -> decimal128(38, 18) (PostgreSQL rounds to 18 decimals; Binance uses at most 8);
  text and jsonb -> string (JSON as its text); NULLs stay nulls.

The columns and their types are read from the database, so new columns need no change here.
The output file is written beside its final name and renamed only on success: an error, Ctrl-C or
SIGTERM leaves no partial file under the final name and removes the temporary one.
"""

from __future__ import annotations

from collector.export.plan import RELATIONS, ExportPlan, plan_export
from collector.export.run import ExportResult, export, summary_line

__all__ = ["RELATIONS", "ExportPlan", "ExportResult", "export", "plan_export", "summary_line"]
