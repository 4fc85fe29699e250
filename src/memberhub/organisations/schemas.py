from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

from memberhub.kit.types import ShortText

Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,98}[a-z0-9])?$")]
OrgName = Annotated[ShortText, StringConstraints(min_length=1)]


class OrganisationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: OrgName
    slug: Slug
    parent_id: ShortText | None = None


class OrganisationPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
