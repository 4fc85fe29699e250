from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from memberhub.kit.types import Input, PatchInput, UTCDatetime
from memberhub.members.schemas import OrganisationRef

MAX_EVENT_TYPES = 100
MAX_RATE_LIMIT = 10_000

Url = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=2048, pattern=r"^[^\s]+$"),
]
Description = Annotated[str, StringConstraints(max_length=500, pattern=r"^[^\x00]*$")]
EventTypePattern = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^(\*|[a-z_]+(\.[a-z_]+)*(\.\*)?)$"),
]
EventTypes = Annotated[
    list[EventTypePattern],
    Field(
        min_length=1,
        max_length=MAX_EVENT_TYPES,
        description="Event types to receive: exact names (`points.earned`), wildcards "
        "(`points.*`, `member.*`) or `*` for every event.",
    ),
]
RateLimit = Annotated[
    int, Field(ge=1, le=MAX_RATE_LIMIT, description="Deliveries per second at most; null: none.")
]
Reason = Annotated[str, StringConstraints(max_length=500, pattern=r"^[^\x00]*$")]


class EndpointCreate(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "url": "https://crm.example.com/hooks/memberhub",
                    "description": "CRM updates",
                    "event_types": ["member.created", "points.earned"],
                    "ordered": False,
                }
            ]
        }
    )

    url: Url = Field(description="Where events are POSTed; https unless plain http is allowed.")
    description: Description = ""
    event_types: EventTypes
    organisation_id: OrganisationRef | None = Field(
        default=None,
        description="Only events of this organisation (and its chapters). A key bound to an "
        "organisation always creates endpoints for its own.",
    )
    ordered: bool = Field(
        default=False,
        description="Deliver in commit order: a later event waits until the earlier one "
        "succeeded or finally failed. One delivery in flight at a time.",
    )
    rate_limit: RateLimit | None = None


# Fields a PATCH may not clear.
_REQUIRED_ON_PATCH = ("url", "event_types", "ordered", "description", "enabled")


class EndpointPatch(PatchInput):
    """Only the fields sent change. `enabled: true` re-enables a disabled endpoint;
    `enabled: false` disables it, with `disabled_reason`."""

    not_nullable = _REQUIRED_ON_PATCH

    url: Url | None = None
    description: Description | None = None
    event_types: EventTypes | None = None
    ordered: bool | None = None
    rate_limit: RateLimit | None = None
    enabled: bool | None = None
    disabled_reason: Reason | None = None

    @model_validator(mode="after")
    def _reason_only_when_disabling(self) -> EndpointPatch:
        if self.disabled_reason is not None and self.enabled is not False:
            raise ValueError("disabled_reason is only accepted with enabled: false")
        return self


class EndpointOut(BaseModel):
    id: str
    url: str
    description: str
    event_types: list[str]
    organisation_id: str | None
    ordered: bool
    rate_limit: int | None
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    failing_since: datetime | None = Field(
        description="The first failure since the last success; null while healthy."
    )
    last_success_at: datetime | None
    last_failure_at: datetime | None
    previous_secret_expires_at: datetime | None = Field(
        description="During a rotation: when the previous secret stops being signed with."
    )
    created_at: datetime
    updated_at: datetime


class EndpointWithSecret(EndpointOut):
    secret: str = Field(description="The signing secret (`whsec_…`). Shown only this once.")


class RecoverRequest(Input):
    since: UTCDatetime = Field(description="Failed deliveries created at or after this time…")
    until: UTCDatetime | None = Field(default=None, description="…and before this one (now).")

    @model_validator(mode="after")
    def _window(self) -> RecoverRequest:
        if self.until is not None and self.until <= self.since:
            raise ValueError("until must be later than since")
        return self


class RecoverOut(BaseModel):
    requeued: int = Field(description="Failed deliveries queued for one more attempt.")


class TestRequest(Input):
    message: Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")] = (
        "A test event from memberhub."
    )


class AttemptOut(BaseModel):
    number: int
    started_at: datetime
    duration_ms: int
    succeeded: bool
    status_code: int | None
    response_body: str | None = Field(description="The first 2 KB of the response body.")
    error: str | None


class DeliveryOut(BaseModel):
    id: str
    endpoint_id: str
    event_id: str
    event_type: str
    status: str = Field(description="pending, succeeded or failed.")
    attempt_count: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    completed_at: datetime | None
    attempts: list[AttemptOut]
