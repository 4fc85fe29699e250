from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EventOut(BaseModel):
    id: str
    type: str
    version: int
    occurred_at: datetime
    member_id: str | None
    data: dict[str, Any]


class EventTypeOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    type: str
    version: int
    description: str
    data_schema: dict[str, Any] = Field(alias="schema")


class EventTypeList(BaseModel):
    data: list[EventTypeOut]
