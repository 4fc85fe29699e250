from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints

from memberhub.kit.types import Input, Name, PatchInput

StaffRole = Literal["admin", "manager", "support_agent"]
OrganisationRef = Annotated[str, StringConstraints(min_length=1, max_length=45)]
Password = Annotated[str, StringConstraints(min_length=12, max_length=200)]


class StaffCreate(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"email": "ana@example.org", "name": "Ana Lima", "role": "manager"}]
        }
    )

    email: EmailStr = Field(max_length=320)
    name: Name
    role: StaffRole
    organisation_id: OrganisationRef | None = Field(
        default=None, description="Limit the staff user to this organisation and its chapters."
    )
    password: Password | None = Field(
        default=None,
        description="The first password; when left out, one is generated and returned once.",
    )


class StaffUpdate(PatchInput):
    not_nullable = ("name", "role", "active")

    name: Name | None = None
    role: StaffRole | None = None
    organisation_id: OrganisationRef | None = Field(
        default=None, description="`null` makes the staff user installation-wide."
    )
    active: bool | None = Field(default=None, description="`false` signs the user out.")


class StaffOut(BaseModel):
    id: str
    email: str
    name: str
    role: StaffRole
    organisation_id: str | None
    active: bool
    totp_enabled: bool
    locked_until: datetime | None
    last_sign_in_at: datetime | None
    created_at: datetime


class StaffCreated(StaffOut):
    one_time_password: str | None = Field(
        description="The generated first password (when none was given): shown only here."
    )
