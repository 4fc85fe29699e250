from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints, field_validator

from memberhub.kit.types import Input, LongText, Name, PatchInput
from memberhub.members.schemas import (
    MAX_EXTERNAL_IDS,
    CustomKey,
    CustomValue,
    ExternalId,
    ExternalSystem,
    OrganisationRef,
    Phone,
    check_custom_fields,
)

# A lead's source or agent: 1 to 100 characters, no control characters (as a name).
Label = Name
PlanRef = Annotated[str, StringConstraints(min_length=1, max_length=45)]
UpdatableStatus = Literal["new", "contacted", "qualified", "lost"]


class LeadCreate(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "email": "lee.tan@example.com",
                    "first_name": "Lee",
                    "last_name": "Tan",
                    "source": "Website",
                    "agent_id": "agent-12",
                }
            ]
        }
    )

    email: EmailStr | None = Field(default=None, max_length=320)
    first_name: Name | None = None
    last_name: Name | None = None
    phone: Phone | None = None
    source: Label | None = Field(default=None, description="Where the lead came from.")
    agent_id: Label | None = Field(default=None, description="Who works the lead.")
    organisation_id: OrganisationRef | None = Field(
        default=None, description="Defaults to the API key's organisation, if it has one."
    )
    custom_fields: dict[CustomKey, CustomValue] = Field(default_factory=dict)
    external_ids: dict[ExternalSystem, ExternalId] = Field(
        default_factory=dict, max_length=MAX_EXTERNAL_IDS
    )

    _custom = field_validator("custom_fields")(check_custom_fields)


class LeadPatch(PatchInput):
    """Fields to change; for `custom_fields` and `external_ids` a null value removes a key.
    `status` moves the lead along new → contacted → qualified, or to lost (and a lost lead
    back to new); a lead becomes enrolled only through …/enroll."""

    not_nullable = ("status", "custom_fields", "external_ids")

    email: EmailStr | None = Field(default=None, max_length=320)
    first_name: Name | None = None
    last_name: Name | None = None
    phone: Phone | None = None
    source: Label | None = None
    agent_id: Label | None = None
    status: UpdatableStatus | None = None
    lost_reason: LongText | None = None
    custom_fields: dict[CustomKey, CustomValue] | None = None
    external_ids: dict[ExternalSystem, ExternalId | None] | None = Field(
        default=None, max_length=MAX_EXTERNAL_IDS
    )

    _custom = field_validator("custom_fields")(check_custom_fields)


class LeadEnroll(Input):
    plan_id: PlanRef | None = Field(
        default=None, description="Join this plan at once; without it the member is pending."
    )
    note: LongText | None = None


MAX_IMPORT_RECORDS = 10_000


class LeadImportRecord(Input):
    """One lead as another system holds it."""

    external_id: ExternalId | None = Field(
        default=None, description="The lead's id in the system named by `source`."
    )
    email: EmailStr | None = Field(default=None, max_length=320)
    first_name: Name | None = None
    last_name: Name | None = None
    phone: Phone | None = None
    status: UpdatableStatus | None = None
    source: Label | None = Field(default=None, description="Defaults to the import's source.")
    agent_id: Label | None = None
    custom_fields: dict[CustomKey, CustomValue] | None = None

    _custom = field_validator("custom_fields")(check_custom_fields)


class LeadImport(Input):
    source: ExternalSystem = Field(
        description="The system the records come from, e.g. salesforce: their `external_id` "
        "is kept as the lead's external id there."
    )
    organisation_id: OrganisationRef | None = Field(
        default=None, description="Defaults to the API key's organisation, if it has one."
    )
    leads: list[Any] = Field(
        min_length=1,
        max_length=MAX_IMPORT_RECORDS,
        description="Each record is checked on its own: invalid ones are reported, the "
        "others stored.",
    )


class ImportResult(BaseModel):
    index: int
    outcome: Literal["created", "updated", "unchanged", "failed"]
    lead_id: str | None = None
    errors: list[dict[str, str]] = Field(default_factory=list)


class LeadImportOut(BaseModel):
    created: int
    updated: int
    unchanged: int
    failed: int
    results: list[ImportResult]


class LeadOut(BaseModel):
    id: str
    organisation_id: str | None
    email: str | None
    first_name: str | None
    last_name: str | None
    phone: str | None
    status: str
    source: str | None
    agent_id: str | None
    lost_reason: str | None
    custom_fields: dict[str, Any]
    external_ids: dict[str, str]
    member_id: str | None
    version: int
    status_changed_at: datetime
    created_at: datetime
    updated_at: datetime


class EnrollmentOut(BaseModel):
    lead: LeadOut
    member_id: str
    plan_id: str | None
