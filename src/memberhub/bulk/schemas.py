from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from memberhub.bulk.upload import CSV_MEDIA_TYPE, JSON_MEDIA_TYPE, MAX_ROWS
from memberhub.points.schemas import MAX_POINTS


class BulkJobLinks(BaseModel):
    self: str
    rows: str
    report_csv: str


class BulkJobOut(BaseModel):
    id: str
    status: str = Field(description="queued, running, completed or failed.")
    total_rows: int
    processed_rows: int
    applied_rows: int
    duplicate_rows: int
    failed_rows: int
    progress_percent: float = Field(description="processed_rows / total_rows, in percent.")
    default_reason: str | None
    created_by: str = Field(description="The API key that uploaded the rows.")
    error: str | None = Field(description="Why a failed job stopped.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: BulkJobLinks


class BulkRowOut(BaseModel):
    row_number: int = Field(description="1 for the first row after the header.")
    outcome: str = Field(description="applied, duplicate or failed.")
    member_id: str | None = Field(
        description="The member credited (`mem_…`, also for a row that gave an email); for a "
        "failed row, the member id or email the row gave."
    )
    points: int | None
    reference_id: str | None
    transaction_id: str | None
    error: str | None


class MemberImportOut(BaseModel):
    id: str
    status: str = Field(description="queued, running, completed or failed.")
    dry_run: bool = Field(description="Rows were checked and reported, then rolled back.")
    options: dict[str, Any]
    total_rows: int
    processed_rows: int
    changed_rows: int = Field(description="Rows that created or updated a member.")
    unchanged_rows: int = Field(description="Rows matching a member they would not change.")
    failed_rows: int
    progress_percent: float = Field(description="processed_rows / total_rows, in percent.")
    created_by: str = Field(description="The API key that uploaded the rows.")
    error: str | None = Field(description="Why a failed job stopped.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: BulkJobLinks


class ImportRowOut(BaseModel):
    row_number: int = Field(description="1 for the first row after the header (or line).")
    action: str | None = Field(
        description="created, updated or unchanged (what it would do, in a dry run); null "
        "when the row failed."
    )
    member_id: str | None = Field(
        description="The member's id, or the email the row gave (`erased` once that member "
        "is erased)."
    )
    opening_points: int | None = Field(
        description="The member's opening balance: awarded by this row, or by an earlier "
        "import (then never again, whatever this row gives)."
    )
    transaction_id: str | None = Field(description="The opening balance's transaction.")
    error: str | None = Field(description="Why the row was refused; nothing of it is written.")


_TEXT = {"type": "string", "maxLength": 1000}
_ROW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "One award: member_id or email, points, and a reason unless defaulted.",
    "properties": {
        "member_id": {"type": "string", "maxLength": 64},
        "email": {"type": "string", "maxLength": 320},
        "points": {"type": "integer", "minimum": 1, "maximum": MAX_POINTS},
        "reason": _TEXT,
        "reference_id": {"type": "string", "maxLength": 200},
        "expires_at": {"type": "string", "format": "date-time"},
    },
}
# The route reads its body itself (CSV or JSON), so the request body is described here.
UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            f"Up to {MAX_ROWS:,} rows: CSV with a header row naming the columns (member_id or "
            "email, points, and optionally reason, reference_id, expires_at), or JSON."
        ),
        "content": {
            CSV_MEDIA_TYPE: {"schema": {"type": "string"}},
            JSON_MEDIA_TYPE: {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["rows"],
                    "properties": {
                        "reason": {**_TEXT, "description": "The default reason."},
                        "rows": {"type": "array", "maxItems": MAX_ROWS, "items": _ROW_SCHEMA},
                    },
                }
            },
        },
    }
}

MEMBER_IMPORT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            f"Up to {MAX_ROWS:,} members: CSV with a header row, or JSON Lines (one object "
            "per line). Fields: email (required), first_name, last_name, phone, "
            "date_of_birth, organisation_id, plan_id, external_id (SYSTEM:ID), "
            "consent_email, consent_sms, consent_analytics, consent_profiling, "
            "consent_crm, consent_marketing_email, "
            "opening_points, and custom.<key>; other column names are mapped to them with "
            "`mapping`."
        ),
        "content": {
            CSV_MEDIA_TYPE: {"schema": {"type": "string"}},
            "application/x-ndjson": {"schema": {"type": "string"}},
        },
    }
}
