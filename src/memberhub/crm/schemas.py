from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from memberhub.kit.types import Input


class SyncRequest(Input):
    mode: Literal["push", "pull"]
    dry_run: bool = Field(
        default=False, description="Report what would change; write nothing on either side."
    )


class SyncRunOut(BaseModel):
    id: str
    integration_id: str
    mode: str
    trigger: str = Field(
        description="manual, schedule, changes (the push of recent edits), or gap (a full push"
        " after events the sync had not read yet were purged)."
    )
    dry_run: bool
    status: Literal["queued", "running", "completed", "failed"]
    created: int
    updated: int
    skipped: int
    failed: int
    conflicts: int
    requests: int = Field(description="Batches written to the CRM and pages read from it.")
    cursor_before: dict[str, Any]
    cursor_after: dict[str, Any]
    error: str | None
    requested_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class SyncRunRecordOut(BaseModel):
    entity_type: str | None
    entity_id: str | None
    external_id: str | None
    outcome: Literal["created", "updated", "failed", "conflict"]
    changes: dict[str, Any]
    error: str | None


class ConflictOut(BaseModel):
    id: str
    integration_id: str
    entity_type: str
    entity_id: str
    external_id: str | None
    field: str
    property: str
    memberhub_value: Any
    crm_value: Any
    crm_modified_at: datetime | None
    status: Literal["open", "resolved"]
    resolution: str | None
    resolved_by: str | None
    created_at: datetime
    resolved_at: datetime | None


class ConflictResolution(Input):
    keep: Literal["memberhub", "crm"] = Field(
        description="memberhub: our value is sent to the CRM; crm: the CRM's value is taken."
    )


class ExternalSyncStatus(BaseModel):
    last_sync: datetime | None = Field(description="When the last sync run finished.")
    pending_updates: int = Field(description="Members and leads with changes not yet sent.")
    sync_errors: int = Field(description="Members and leads whose last write failed.")
    open_conflicts: int
    connected_crms: list[str]


class SyncActivity(BaseModel):
    """What CRM sync runs did since a moment (seed 003's "today's activity")."""

    since: datetime
    runs: int = Field(description="Runs started since then, dry runs left out.")
    completed_runs: int
    failed_runs: int
    leads_imported: int = Field(description="Leads created here by pulls from the CRMs.")
    leads_updated: int = Field(description="Leads updated here by pulls from the CRMs.")
    records_created: int = Field(description="Records created on either side, by any run.")
    records_updated: int
    records_failed: int = Field(description="Records a run could not write (sync errors).")
    average_run_seconds: float | None = Field(
        description="Mean time from start to finish of the finished runs; null without any."
    )
    success_rate: float | None = Field(
        description="Percent of finished runs that completed; null without any."
    )
