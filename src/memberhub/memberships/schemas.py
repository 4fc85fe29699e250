from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from memberhub.kit.types import Code, Input, LongText, PatchInput, ShortText
from memberhub.members.schemas import MemberOut

Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
PlanName = Annotated[ShortText, StringConstraints(min_length=1)]
Note = Annotated[LongText, Field(description="Free text kept in the status history.")]
# Minor units of any currency (IDR and JPY amounts run large), within what JSON readers and
# JavaScript hold exactly.
MAX_PRICE = 2**53 - 1


class PlanCreate(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "code": "annual",
                    "name": "Annual membership",
                    "term_months": 12,
                    "price_amount": 12000,
                    "currency": "EUR",
                    "grace_days": 30,
                    "renewal_window_days": 30,
                    "auto_renew": True,
                }
            ]
        }
    )

    code: Code
    name: PlanName
    term_months: int = Field(ge=1, le=120)
    price_amount: int = Field(ge=0, le=MAX_PRICE, description="Price in minor currency units.")
    currency: Currency
    grace_days: int = Field(default=30, ge=0, le=365)
    renewal_window_days: int = Field(default=30, ge=0, le=365)
    auto_renew: bool = False
    organisation_id: ShortText | None = None


class PlanPatch(PatchInput):
    not_nullable = (
        "name",
        "price_amount",
        "currency",
        "grace_days",
        "renewal_window_days",
        "auto_renew",
        "active",
    )

    name: PlanName | None = None
    price_amount: int | None = Field(default=None, ge=0, le=MAX_PRICE)
    currency: Currency | None = None
    grace_days: int | None = Field(default=None, ge=0, le=365)
    renewal_window_days: int | None = Field(default=None, ge=0, le=365)
    auto_renew: bool | None = None
    active: bool | None = None


class PlanOut(BaseModel):
    id: str
    code: str
    name: str
    organisation_id: str | None
    term_months: int
    price_amount: int
    currency: str
    grace_days: int
    renewal_window_days: int
    auto_renew: bool
    active: bool
    created_at: datetime
    updated_at: datetime


class JoinRequest(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"plan_id": "pln_0a1b2c3d4e", "note": "Joined at the spring conference"}]
        }
    )

    plan_id: ShortText
    note: Note | None = None


class RenewRequest(Input):
    plan_id: ShortText | None = Field(
        default=None, description="Renew onto another plan; defaults to the current plan."
    )
    note: Note | None = None


class UpgradeRequest(Input):
    plan_id: ShortText
    note: Note | None = None


class CancelRequest(Input):
    at_period_end: bool = Field(
        default=False, description="Keep the membership until the current term ends."
    )
    note: Note | None = None


class StatusNote(Input):
    note: Note | None = None


class TermOut(BaseModel):
    id: str
    plan_id: str
    kind: str
    starts_at: datetime
    ends_at: datetime
    ended_early_at: datetime | None


class MembershipResult(BaseModel):
    member: MemberOut
    term: TermOut | None


class StatusChangeOut(BaseModel):
    id: int
    from_status: str
    to_status: str
    reason: str
    note: str | None
    actor: str
    occurred_at: datetime
