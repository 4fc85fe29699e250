from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from memberhub.kit.types import Input, LongText


class ApprovalOut(BaseModel):
    id: str
    operation: str
    member_id: str
    points: int
    reason: str
    reference_id: str | None
    status: str
    requested_by: str
    requested_role: str
    decided_by: str | None
    decision_note: str | None
    transaction_id: str | None
    created_at: datetime
    decided_at: datetime | None


class Decision(Input):
    note: LongText | None = None
