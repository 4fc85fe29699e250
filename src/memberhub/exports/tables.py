"""What each exportable table is: its columns as exported, their Arrow types, the key rows
are paged and watermarked by, and the date that partitions them.

Columns are exported as stored (internal ids included, so tables join in the warehouse),
with times as UTC timestamps (microseconds) and JSON columns as JSON text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Date,
    Integer,
    Select,
    String,
    Table,
    Text,
    cast,
    select,
    type_coerce,
)
from sqlalchemy.ext.asyncio import AsyncSession

import memberhub.models  # noqa: F401  (every table in the metadata)
from memberhub.kit.db import Base, UTCDateTime

TIMESTAMP = pa.timestamp("us", tz="UTC")
# Kept out of every export: a member's data key must exist only where erasure deletes it.
NOT_EXPORTED = frozenset({"data_key"})


@dataclass(frozen=True)
class ExportTable:
    name: str  # the name in the API and the warehouse
    table: str  # the database table
    key: str  # ascending, unique: pages and the incremental watermark
    partition: str  # the timestamp whose UTC date partitions the files
    description: str

    @property
    def sql_table(self) -> Table:
        return Base.metadata.tables[self.table]


TABLES: dict[str, ExportTable] = {
    spec.name: spec
    for spec in (
        ExportTable("members", "members", "id", "created_at", "Members: profile, consent, status."),
        ExportTable(
            "memberships",
            "membership_terms",
            "id",
            "created_at",
            "Membership terms: each join, renewal and upgrade with its dates.",
        ),
        ExportTable(
            "point_transactions",
            "point_transactions",
            "id",
            "occurred_at",
            "The points ledger, one row per operation.",
        ),
        ExportTable(
            "point_batches",
            "point_batches",
            "id",
            "created_at",
            "Points earned together, with their expiry and what remains.",
        ),
        ExportTable(
            "events",
            "events",
            "position",
            "occurred_at",
            "The event feed, in commit order (by position).",
        ),
        ExportTable(
            "activities",
            "activities",
            "id",
            "recorded_at",
            "Activities recorded from integrations and the API.",
        ),
        ExportTable("leads", "leads", "id", "created_at", "Leads and their pipeline status."),
    )
}


def arrow_type(column: Column[Any]) -> pa.DataType:
    column_type = column.type
    if isinstance(column_type, UTCDateTime):
        return TIMESTAMP
    if isinstance(column_type, Boolean):
        return pa.bool_()
    if isinstance(column_type, Date):
        return pa.date32()
    if isinstance(column_type, BigInteger | Integer):
        return pa.int64()
    if isinstance(column_type, JSON):
        return pa.string()
    if isinstance(column_type, String | Text):
        return pa.string()
    raise TypeError(f"no export type for {column.table.name}.{column.name}: {column_type!r}")


def columns(spec: ExportTable) -> list[Column[Any]]:
    """Exported columns: the key first, then the table's columns in declared order."""
    table = spec.sql_table
    return [
        table.c[spec.key],
        *(c for c in table.c if c.name != spec.key and c.name not in NOT_EXPORTED),
    ]


def arrow_schema(spec: ExportTable) -> pa.Schema:
    return pa.schema(
        [pa.field(c.name, arrow_type(c), nullable=bool(c.nullable)) for c in columns(spec)]
    )


def json_columns(spec: ExportTable) -> frozenset[str]:
    return frozenset(c.name for c in columns(spec) if isinstance(c.type, JSON))


def schema_out(spec: ExportTable) -> list[dict[str, Any]]:
    """The schema as documented in manifests and the README."""
    return [
        {
            "name": field.name,
            "type": str(field.type),
            "nullable": field.nullable,
            **({"json": True} if field.name in json_columns(spec) else {}),
        }
        for field in arrow_schema(spec)
    ]


def _selected(column: Column[Any], *, sqlite: bool) -> ColumnElement[Any]:
    """The column as read for export: values the Arrow conversion takes directly.

    JSON is read as its text (not parsed and dumped again). On SQLite, times and dates are
    read as the text SQLite keeps and parsed by Arrow, many times faster than per value.
    """
    if isinstance(column.type, JSON):
        return cast(column, Text).label(column.name)
    if sqlite and isinstance(column.type, UTCDateTime | Date):
        return type_coerce(column, String).label(column.name)
    return column


def page_query(
    spec: ExportTable, *, sqlite: bool, after: int | None, upto: int, limit: int
) -> Select[Any]:
    """The next `limit` rows with after < key <= upto, in key order (keyset pagination)."""
    table = spec.sql_table
    key = table.c[spec.key]
    query = (
        select(*(_selected(c, sqlite=sqlite) for c in columns(spec)))
        .where(key <= upto)
        .order_by(key)
        .limit(limit)
    )
    if after is not None:
        query = query.where(key > after)
    elif spec.key != "id":
        query = query.where(key.is_not(None))
    return query


async def fetch_page(session: AsyncSession, query: Select[Any]) -> Sequence[Sequence[Any]]:
    """The page's rows as the driver returns them (tuples, asyncpg records): the query is
    compiled by SQLAlchemy and run on the session's own connection, skipping the result
    layer, which would cost as much as the rest of the export (the Arrow conversion
    types each column itself)."""
    connection = await session.connection()
    compiled = query.compile(dialect=connection.dialect)
    params = compiled.construct_params()
    arguments = [params[name] for name in compiled.positiontup or ()]
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection
    if connection.dialect.name == "postgresql":
        rows: Sequence[Sequence[Any]] = await driver.fetch(compiled.string, *arguments)
        return rows
    cursor = await driver.execute(compiled.string, arguments)
    try:
        fetched: Sequence[Sequence[Any]] = await cursor.fetchall()
    finally:
        await cursor.close()
    return fetched


def to_record_batch(
    spec: ExportTable, schema: pa.Schema, rows: Sequence[Sequence[Any]]
) -> pa.RecordBatch:
    """A page of rows as Arrow columns, typed by the table's schema."""
    arrays = []
    for index, values in enumerate(zip(*rows, strict=True)):
        field = schema.field(index)
        if field.type == TIMESTAMP and values and _first(values, str):
            arrays.append(pa.array(values, pa.string()).cast(pa.timestamp("us")).cast(TIMESTAMP))
        elif field.type == pa.date32() and _first(values, str):
            arrays.append(pa.array(values, pa.string()).cast(pa.date32()))
        elif field.type == pa.bool_() and not _first(values, bool):
            arrays.append(pa.array(values, pa.int64()).cast(pa.bool_()))  # SQLite's 0 and 1
        else:
            arrays.append(pa.array(values, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _first(values: Sequence[Any], kind: type) -> bool:
    """Whether the column's values are of `kind` (judged by its first non-null value)."""
    return next((isinstance(value, kind) for value in values if value is not None), False)
