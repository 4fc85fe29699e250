"""Writing a part: Arrow record batches into one local file per partition date, in the
export's format. Memory holds one page of rows at a time; Parquet row groups are flushed
as pages arrive."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from memberhub.exports.models import ExportFormat

CONTENT_TYPES = {
    ExportFormat.PARQUET: "application/vnd.apache.parquet",
    ExportFormat.CSV: "text/csv",
    ExportFormat.JSONL: "application/x-ndjson",
}
# Hive's name for rows whose partition value is null.
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
PARQUET_COMPRESSION = "zstd"


@dataclass(frozen=True)
class WrittenFile:
    dt: str
    path: Path
    rows: int


def partition_dates(batch: pa.RecordBatch, column: str) -> pa.Array:
    """Each row's partition: the UTC date of `column` (timestamps are kept in UTC)."""
    return pc.cast(batch.column(column), pa.date32())


def _partition_name(day: date | None) -> str:
    return day.isoformat() if day is not None else NULL_PARTITION


class _JsonLinesWriter:
    def __init__(self, path: Path, json_columns: frozenset[str]) -> None:
        self._file: IO[str] = path.open("w", encoding="utf-8")
        self._json_columns = json_columns

    def write_batch(self, batch: pa.RecordBatch) -> None:
        lines = []
        for row in batch.to_pylist():
            for name in self._json_columns:
                value = row.get(name)
                if value is not None:
                    row[name] = json.loads(value)
            lines.append(json.dumps(row, default=_json_default, separators=(",", ":")))
        self._file.write("\n".join(lines) + "\n")

    def close(self) -> None:
        self._file.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class PartWriter:
    """The files of one part: `<directory>/<dt>.<ext>`, one per partition date."""

    def __init__(
        self,
        directory: Path,
        export_format: str,
        schema: pa.Schema,
        partition_column: str,
        json_columns: frozenset[str],
    ) -> None:
        self.directory = directory
        self.format = export_format
        self.schema = schema
        self.partition_column = partition_column
        self.json_columns = json_columns
        self._writers: dict[str, Any] = {}
        self._rows: dict[str, int] = {}

    def _writer(self, dt: str) -> Any:
        writer = self._writers.get(dt)
        if writer is None:
            path = self.directory / f"{dt}.{self.format}"
            if self.format == ExportFormat.PARQUET:
                writer = pq.ParquetWriter(path, self.schema, compression=PARQUET_COMPRESSION)
            elif self.format == ExportFormat.CSV:
                writer = pa_csv.CSVWriter(path, self.schema)
            else:
                writer = _JsonLinesWriter(path, self.json_columns)
            self._writers[dt] = writer
            self._rows[dt] = 0
        return writer

    def write(self, batch: pa.RecordBatch) -> None:
        dates = partition_dates(batch, self.partition_column)
        distinct = pc.unique(dates).to_pylist()
        if len(distinct) == 1:
            self._write_one(_partition_name(distinct[0]), batch)
            return
        for day in distinct:
            rows = pc.is_null(dates) if day is None else pc.fill_null(pc.equal(dates, day), False)
            self._write_one(_partition_name(day), batch.filter(rows))

    def _write_one(self, dt: str, batch: pa.RecordBatch) -> None:
        self._writer(dt).write_batch(batch)
        self._rows[dt] += batch.num_rows

    def close(self) -> list[WrittenFile]:
        for writer in self._writers.values():
            writer.close()
        files = [
            WrittenFile(dt=dt, path=self.directory / f"{dt}.{self.format}", rows=self._rows[dt])
            for dt in sorted(self._writers)
        ]
        self._writers.clear()
        return files
