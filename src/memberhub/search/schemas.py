from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class SearchStatusOut(BaseModel):
    integration_id: str
    provider: str
    indices: list[str] = Field(description="The indices kept in step: rewards, then members.")
    member_directory: bool = Field(description="Whether consenting members are indexed.")
    position: int | None = Field(
        description="The last event-feed position whose changes are in the indices; null "
        "before the first worker pass."
    )
    latest_position: int = Field(description="The event feed's latest position.")
    pending_events: int = Field(description="Events committed after `position`.")
    reindex_requested_at: datetime | None = Field(
        description="A full reindex waits for the worker since then."
    )
    last_reindex_at: datetime | None
    last_synced_at: datetime | None
    records_saved: int
    records_deleted: int
    failures: int = Field(description="Failed attempts in a row; 0 after a success.")
    last_error: str | None
    last_error_at: datetime | None
    next_attempt_at: datetime | None = Field(description="When a failed sync is tried again.")
