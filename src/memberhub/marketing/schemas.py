from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from memberhub.kit.types import Input


class SegmentOut(BaseModel):
    key: str
    name: str
    remote_id: str | None = Field(description="The segment's id at the vendor.")
    members: int = Field(description="Addresses the segment was last given.")
    synced_at: datetime | None


class MarketingStatusOut(BaseModel):
    integration_id: str
    provider: str
    list_id: str
    position: int | None = Field(
        description="The last event-feed position whose changes reached the audience; null "
        "before the first worker pass."
    )
    pending_events: int = Field(description="Events committed after `position`.")
    full_requested_at: datetime | None = Field(
        description="A full comparison of every member waits for the worker since then."
    )
    last_full_sync_at: datetime | None
    last_synced_at: datetime | None
    members_written: int = Field(description="Member writes the vendor accepted, all runs.")
    last_run_writes: int
    last_run_requests: int = Field(description="Calls the last run made to the vendor.")
    contacts: dict[str, int] = Field(
        description="Members by their status at the vendor: subscribed, unsubscribed, cleaned."
    )
    journeys: dict[str, int] = Field(
        description="Journey firings by status: pending, sent, skipped, failed."
    )
    segments: list[SegmentOut]
    failures: int = Field(description="Failed attempts in a row; 0 after a success.")
    last_error: str | None
    last_error_at: datetime | None
    next_attempt_at: datetime | None


class MarketingSyncRequest(Input):
    full: bool = Field(
        default=True,
        description="Compare every member (true), or only those changed since the last run.",
    )
    dry_run: bool = Field(
        default=False,
        description="Show what would be sent and change nothing, here or at the vendor.",
    )


class SegmentPlanOut(BaseModel):
    key: str
    name: str
    create: bool = Field(description="The segment does not exist at the vendor yet.")
    add: int
    remove: int


class MarketingDryRunOut(BaseModel):
    integration_id: str
    dry_run: bool = True
    members_to_write: int
    requests: int = Field(
        description="Calls the writes would take: whole batches, plus segment changes."
    )
    writes: list[dict[str, Any]] = Field(description="The first 100 member writes, as sent.")
    segments: list[SegmentPlanOut]
