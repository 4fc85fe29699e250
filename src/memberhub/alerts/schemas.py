from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from memberhub.kit.types import Input, LongText


class AlertOut(BaseModel):
    id: str
    type: str
    priority: str = Field(description="low, medium or high.")
    status: str = Field(description="open or acknowledged.")
    member_id: str | None = Field(description="None for a system-wide alert.")
    message: str
    data: dict[str, Any]
    points: int | None
    raised_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    note: str | None


class AcknowledgeRequest(Input):
    note: LongText | None = Field(default=None, description="Kept with the alert.")
