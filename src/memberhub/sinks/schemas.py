from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from memberhub.kit.types import Input, PatchInput, UTCDatetime
from memberhub.webhooks.schemas import EventTypes

SinkName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\x00]+$"),
]
IntegrationRef = Annotated[str, StringConstraints(min_length=1, max_length=45)]
EventType = Annotated[str, StringConstraints(pattern=r"^[a-z_]+(\.[a-z_]+)+$", max_length=64)]
VendorName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\x00]+$"),
]
Mapping = Annotated[
    dict[EventType, VendorName],
    Field(
        max_length=100,
        description="Our event type to the vendor's event name; types left out take the "
        "provider's defaults (see the README), others their type with underscores.",
    ),
]
MAX_DRY_RUN_EVENTS = 500


class SinkCreate(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "integration_id": "int_0123456789",
                    "name": "Segment: loyalty events",
                    "event_types": ["member.*", "points.*"],
                    "mapping": {"points.earned": "Points Earned"},
                }
            ]
        }
    )

    integration_id: IntegrationRef = Field(description="A Segment or GA4 integration.")
    name: SinkName
    event_types: EventTypes
    mapping: Mapping = Field(default_factory=dict)
    request_deletion: bool = Field(
        default=True,
        description="When a member withdraws the sink's consent purpose, ask the vendor to "
        "delete their data where it has an API for it.",
    )
    enabled: bool = True


class SinkPatch(PatchInput):
    not_nullable = ("name", "event_types", "mapping", "request_deletion", "enabled")

    name: SinkName | None = None
    event_types: EventTypes | None = None
    mapping: Mapping | None = None
    request_deletion: bool | None = None
    enabled: bool | None = None


class ReplayRequest(Input):
    since: UTCDatetime = Field(description="Events that occurred at or after this moment…")
    until: UTCDatetime = Field(description="…and before this one.")

    @model_validator(mode="after")
    def _ordered(self) -> ReplayRequest:
        if self.until <= self.since:
            raise ValueError("until must be after since")
        return self


class DryRunRequest(Input):
    limit: int = Field(default=100, ge=1, le=MAX_DRY_RUN_EVENTS)
    since: UTCDatetime | None = Field(
        default=None,
        description="Read the events from this moment (with `until`) instead of those the "
        "sink has still to send.",
    )
    until: UTCDatetime | None = None
    validate_requests: bool = Field(
        default=False,
        description="Also ask the vendor's validation endpoint about each request (GA4's "
        "/debug/mp/collect; nothing is recorded there).",
    )

    @model_validator(mode="after")
    def _range(self) -> DryRunRequest:
        if (self.since is None) != (self.until is None):
            raise ValueError("since and until go together")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError("until must be after since")
        return self


class SinkOut(BaseModel):
    id: str
    integration_id: str
    provider: str
    name: str
    consent_purpose: str
    event_types: list[str]
    mapping: dict[str, str] = Field(description="In force: the provider's defaults and yours.")
    request_deletion: bool
    enabled: bool
    event_position: int
    lag: int = Field(description="Events committed to the feed that the sink has not reached.")
    replay: dict[str, int] | None = Field(description="A replay under way: its feed range.")
    failures: int
    failing_since: datetime | None
    next_attempt_at: datetime | None
    last_error: str | None
    last_success_at: datetime | None
    events_sent: int
    events_skipped: int
    events_refused: int
    requests_sent: int
    deletions_requested: int
    created_at: datetime
    updated_at: datetime


class DeliveryOut(BaseModel):
    id: int
    replay: bool
    first_position: int
    last_position: int
    status: str
    events_sent: int
    events_skipped: int
    events_refused: int
    requests: int
    deletions: int
    error: str | None
    started_at: datetime
    duration_ms: int


class PlannedRequest(BaseModel):
    path: str
    events: list[str]
    body: dict[str, Any]
    validation_messages: list[str] | None = None


class DryRunOut(BaseModel):
    events_read: int
    events_to_send: int
    events_skipped: int = Field(description="About members without the purpose's consent.")
    deletions: list[str] = Field(description="Members whose data a deletion would be asked for.")
    requests: list[PlannedRequest]
    refused: list[dict[str, str]]


class SinkStatus(BaseModel):
    id: str
    integration_id: str
    provider: str
    name: str
    enabled: bool
    healthy: bool
    lag: int
    failures: int
    failing_since: datetime | None
    last_success_at: datetime | None
    last_error: str | None
    events_sent: int
