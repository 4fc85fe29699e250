from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints, field_validator

from memberhub.exports import schedule
from memberhub.kit.types import Input, Name

TableName = Literal[
    "members",
    "memberships",
    "point_transactions",
    "point_batches",
    "events",
    "activities",
    "leads",
]
FormatName = Literal["csv", "jsonl", "parquet"]
ModeName = Literal["full", "incremental"]
IntegrationRef = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^int_[0-9a-z]{1,40}$")
]


class ExportCreate(Input):
    name: Name
    table: TableName
    format: FormatName = "parquet"
    mode: ModeName = Field(
        default="incremental",
        description="incremental: each run carries the rows committed since the previous "
        "run (by the export's watermark); full: every row, each run.",
    )
    storage_integration_id: IntegrationRef = Field(
        description="An integration with the storage capability (s3, local_storage, …)."
    )
    schedule: str | None = Field(
        default=None,
        max_length=120,
        description="A cron expression (five fields) in the program's time zone, e.g. "
        "`0 2 * * *` for 02:00 every day; none: runs only on demand.",
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return schedule.validated(value)


class ExportOut(BaseModel):
    id: str
    name: str
    table: str
    format: str
    mode: str
    storage_integration_id: str
    schedule: str | None
    next_run_at: datetime | None
    watermark: int | None = Field(
        description="The highest key exported by incremental runs: the row id, or the feed "
        "position for events."
    )
    created_at: datetime
    updated_at: datetime


class ExportRunOut(BaseModel):
    id: str
    export_id: str
    sequence: int
    trigger: str = Field(description="manual or schedule.")
    mode: str
    status: str = Field(description="queued, running, completed or failed.")
    watermark_from: int | None = Field(description="Rows with a key above this (exclusive).")
    watermark_to: int | None = Field(
        description="…up to this key (inclusive); fixed when the run starts."
    )
    total_rows: int | None
    rows: int
    bytes: int
    parts: int
    progress_percent: float | None
    manifest_key: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
