from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from memberhub.kit.types import Code, Input, LongText, PatchInput, ShortText, UTCDatetime
from memberhub.points.schemas import (
    MAX_POINTS,
    BalanceOut,
    PublicIdRef,
    Reason,
    ReferenceId,
)

# stock and per_member_limit are 32-bit columns.
MAX_COUNT = 2**31 - 1
MAX_TIER_CODES = 50

RewardName = Annotated[ShortText, StringConstraints(min_length=1)]
PointsCost = Annotated[int, Field(ge=1, le=MAX_POINTS, description="Points a claim costs.")]
Stock = Annotated[
    int, Field(ge=0, le=MAX_COUNT, description="Units left to claim; null means unlimited.")
]
PerMemberLimit = Annotated[
    int,
    Field(
        ge=1,
        le=MAX_COUNT,
        description="Claims one member may hold (cancelled ones do not count); null: no limit.",
    ),
]
TierCodes = Annotated[
    list[Code],
    Field(
        max_length=MAX_TIER_CODES,
        description="Tiers whose members may claim; empty means every member.",
    ),
]


def _check_window(valid_from: datetime | None, valid_until: datetime | None) -> None:
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        raise ValueError("valid_until must be later than valid_from")


class RewardCreate(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "code": "coffee",
                    "name": "Free coffee",
                    "points_cost": 100,
                    "stock": 500,
                    "per_member_limit": 2,
                }
            ]
        }
    )

    code: Code
    name: RewardName
    description: LongText | None = None
    points_cost: PointsCost
    stock: Stock | None = None
    per_member_limit: PerMemberLimit | None = None
    tier_codes: TierCodes = Field(default_factory=list)
    valid_from: UTCDatetime | None = None
    valid_until: UTCDatetime | None = None
    active: bool = True

    @model_validator(mode="after")
    def _window(self) -> RewardCreate:
        _check_window(self.valid_from, self.valid_until)
        return self


# Fields a PATCH may not clear: the reward always has them.
_REQUIRED_ON_PATCH = ("name", "points_cost", "tier_codes", "active")


class RewardPatch(PatchInput):
    """Only the fields sent change. `stock`, `per_member_limit`, `description`, `valid_from`
    and `valid_until` may be set to null (unlimited, no limit, none, open-ended)."""

    not_nullable = _REQUIRED_ON_PATCH

    name: RewardName | None = None
    description: LongText | None = None
    points_cost: PointsCost | None = None
    stock: Stock | None = Field(default=None, description="The new absolute stock.")
    per_member_limit: PerMemberLimit | None = None
    tier_codes: TierCodes | None = None
    valid_from: UTCDatetime | None = None
    valid_until: UTCDatetime | None = None
    active: bool | None = None


class RewardOut(BaseModel):
    id: str
    code: str
    name: str
    description: str | None
    points_cost: int
    stock: int | None = Field(description="Units left to claim; null means unlimited.")
    per_member_limit: int | None
    tier_codes: list[str]
    valid_from: datetime | None
    valid_until: datetime | None
    active: bool
    claims_count: int = Field(description="Claims that are not cancelled.")
    created_at: datetime
    updated_at: datetime


class ClaimRequest(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"member_id": "mem_0a1b2c3d4e", "reference_id": "kiosk-3-0042"}]
        }
    )

    member_id: PublicIdRef
    reference_id: ReferenceId | None = None


class CancelClaimRequest(Input):
    reason: Reason


class ClaimOut(BaseModel):
    id: str
    reward_id: str
    reward_code: str
    member_id: str
    status: str
    points: int
    reference_id: str | None
    transaction_id: str = Field(description="The redeem transaction that paid for the claim.")
    refund_transaction_id: str | None = Field(
        description="The transaction that gave the points back, once cancelled."
    )
    claimed_at: datetime
    cancelled_at: datetime | None
    cancel_reason: str | None


class ClaimResult(BaseModel):
    claim: ClaimOut
    balance: BalanceOut = Field(description="The member's balance after the operation.")
    replayed: bool = Field(description="True when reference_id matched an earlier claim.")
