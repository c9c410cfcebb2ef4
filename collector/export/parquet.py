"""CSV rows from COPY into typed Arrow record batches into a Parquet file, in bounded memory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO, Final

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from collector.errors import ConfigError
from collector.export.plan import DECIMAL_PRECISION, DECIMAL_SCALE, Column, Kind

# A row group is written once this much Arrow data is buffered: it bounds the memory of an export
# whatever its size, and is still large enough for column scans to read long runs.
ROW_GROUP_BYTES: Final = 16 * 2**20
READ_BLOCK_BYTES: Final = 2**20  # CSV bytes parsed per record batch
COMPRESSION: Final = "zstd"  # smaller than snappy on the JSON payloads at about the same speed

_ARROW_TYPES: Final[dict[Kind, pa.DataType]] = {
    "timestamptz": pa.timestamp("us", tz="UTC"),  # PostgreSQL keeps microseconds
    "timestamp": pa.timestamp("us"),
    "date": pa.date32(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "int16": pa.int16(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "decimal": pa.decimal128(DECIMAL_PRECISION, DECIMAL_SCALE),
    "bool": pa.bool_(),
    "string": pa.string(),
}


def arrow_schema(columns: Sequence[Column]) -> pa.Schema:
    return pa.schema([pa.field(c.name, _ARROW_TYPES[c.kind]) for c in columns])


def _csv_options(
    schema: pa.Schema,
) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    """Options that read PostgreSQL's CSV exactly: NULL is an unquoted empty field, "" an empty string."""
    read = pacsv.ReadOptions(column_names=schema.names, block_size=READ_BLOCK_BYTES)
    parse = pacsv.ParseOptions(newlines_in_values=True)  # text columns may hold newlines
    convert = pacsv.ConvertOptions(
        column_types=schema,
        null_values=[""],  # only the empty field: a symbol or side spelled "NULL" stays a string
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
        true_values=["t"],  # PostgreSQL's boolean output
        false_values=["f"],
    )
    return read, parse, convert


def write_parquet(source: BinaryIO, columns: Sequence[Column], path: str) -> int:
    """Read COPY's CSV (no header) from `source` until EOF and write it to `path`; returns the rows.

    `source` must be a buffered reader (its `peek` tells an empty result from a CSV without rows).
    """
    schema = arrow_schema(columns)
    rows = 0
    try:
        with pq.ParquetWriter(path, schema, compression=COMPRESSION) as writer:
            if not source.peek(1):  # type: ignore[attr-defined]
                return 0  # Arrow refuses an empty CSV; the file keeps the schema and no row group
            reader = pacsv.open_csv(source, *_csv_options(schema))
            pending: list[pa.RecordBatch] = []
            pending_bytes = 0
            for batch in reader:
                pending.append(batch)
                pending_bytes += batch.nbytes
                rows += batch.num_rows
                if pending_bytes >= ROW_GROUP_BYTES:
                    writer.write_table(pa.Table.from_batches(pending, schema))
                    pending, pending_bytes = [], 0
            if pending:
                writer.write_table(pa.Table.from_batches(pending, schema))
    except pa.ArrowException as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"parquet conversion failed: {reason}") from None
    return rows
