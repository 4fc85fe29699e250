from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

from memberhub.kit.types import Input, PatchInput, ShortText

Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,98}[a-z0-9])?$")]
OrgName = Annotated[ShortText, StringConstraints(min_length=1)]


class OrganisationCreate(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "Northern Chapter",
                    "slug": "northern-chapter",
                    "parent_id": "org_0a1b2c3d4e",
                }
            ]
        }
    )

    name: OrgName
    slug: Slug
    parent_id: ShortText | None = None


class OrganisationPatch(PatchInput):
    not_nullable = ("name", "slug")

    name: OrgName | None = None
    slug: Slug | None = None


class OrganisationOut(BaseModel):
    id: str
    name: str
    slug: str
    kind: str
    parent_id: str | None
    created_at: datetime
    updated_at: datetime
