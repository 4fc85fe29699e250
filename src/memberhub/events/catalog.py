"""The event catalog: every event type, its version and the schema of its `data`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from memberhub.members.schemas import MemberOut


class EventData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_type: ClassVar[str]
    version: ClassVar[int] = 1
    description: ClassVar[str]


class MemberCreated(EventData):
    event_type = "member.created"
    description = "A member was created."

    member: MemberOut


class MemberUpdated(EventData):
    event_type = "member.updated"
    description = "A member's profile, consent, custom fields or external ids changed."

    member: MemberOut
    changed_fields: list[str]


class MemberDeleted(EventData):
    event_type = "member.deleted"
    description = "A member's personal data was erased; ledger and audit rows are kept."

    member_id: str
    organisation_id: str | None
    deleted_at: datetime


class MemberStatusChanged(EventData):
    event_type = "member.status.changed"
    description = (
        "A member's membership status changed (join, renew, lapse, cancel, suspend, "
        "reinstate, upgrade, grace)."
    )

    member_id: str
    organisation_id: str | None
    from_status: str
    to_status: str
    reason: str
    plan_id: str | None
    term_ends_at: datetime | None
    grace_ends_at: datetime | None
    occurred_at: datetime


CATALOG: dict[str, type[EventData]] = {
    model.event_type: model
    for model in (MemberCreated, MemberUpdated, MemberDeleted, MemberStatusChanged)
}


def schema_for(model: type[EventData]) -> dict[str, Any]:
    return model.model_json_schema(mode="serialization")
