from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from memberhub.kit.types import Input, Name

KeyRole = Literal["admin", "manager", "support_agent", "integration"]
ScopeName = Annotated[str, StringConstraints(min_length=1, max_length=50)]


class ApiKeyCreate(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "shop", "role": "integration", "rate_limit": "300/minute"},
            ]
        }
    )

    name: Name
    role: KeyRole
    scopes: list[ScopeName] | None = Field(
        default=None, max_length=100, description="Narrow the role's scopes to these."
    )
    organisation_id: Annotated[str, StringConstraints(min_length=1, max_length=45)] | None = Field(
        default=None, description="Limit the key to this organisation and its chapters."
    )
    rate_limit: Annotated[str, StringConstraints(min_length=1, max_length=50)] | None = Field(
        default=None, description="The key's own limit, e.g. `100/minute` (else RATE_LIMIT)."
    )


class ApiKeyOut(BaseModel):
    id: str
    name: str
    role: KeyRole
    scopes: list[str] | None = Field(description="`null`: every scope of the role.")
    organisation_id: str | None
    rate_limit: str | None
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    secret: str = Field(description="The key itself: shown only here, store it now.")
