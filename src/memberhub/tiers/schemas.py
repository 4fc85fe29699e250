from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from memberhub.kit.types import Code, Input, LongText, PatchInput, ShortText, UTCDatetime
from memberhub.tiers.models import TierBasis

MAX_BENEFITS = 50
# Tier columns are 32-bit integers on PostgreSQL.
MAX_RANK = 1_000_000
MAX_THRESHOLD = 2**31 - 1
MAX_WINDOW_DAYS = 3660
MAX_MULTIPLIER_PERCENT = 1000

TierName = Annotated[ShortText, StringConstraints(min_length=1)]
Benefit = Annotated[ShortText, StringConstraints(min_length=1)]
Basis = Literal["lifetime_earned", "rolling_earned", "current_balance"]
Policy = Literal["never", "one_step", "to_qualifying"]
Rank = Annotated[
    int, Field(ge=0, le=MAX_RANK, description="Unique; a higher rank is a better tier.")
]
Threshold = Annotated[
    int, Field(ge=0, le=MAX_THRESHOLD, description="Points of the tier's basis to qualify.")
]
WindowDays = Annotated[
    int,
    Field(ge=1, le=MAX_WINDOW_DAYS, description="The rolling window; only for rolling_earned."),
]
MultiplierPercent = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_MULTIPLIER_PERCENT,
        description="Earn multiplier for members of this tier, in percent (100 = x1).",
    ),
]
Benefits = Annotated[list[Benefit], Field(max_length=MAX_BENEFITS)]


def check_window(basis: str, window_days: int | None) -> None:
    """window_days belongs to the rolling basis, and the rolling basis needs it."""
    if basis == TierBasis.ROLLING_EARNED and window_days is None:
        raise ValueError("window_days is required when basis is rolling_earned")
    if basis != TierBasis.ROLLING_EARNED and window_days is not None:
        raise ValueError("window_days is only allowed when basis is rolling_earned")


class TierCreate(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "code": "gold",
                    "name": "Gold",
                    "rank": 3,
                    "threshold": 5000,
                    "downgrade_policy": "one_step",
                    "earn_multiplier_percent": 150,
                    "benefits": ["Priority booking"],
                }
            ]
        }
    )

    code: Code
    name: TierName
    rank: Rank
    threshold: Threshold
    basis: Basis = "lifetime_earned"
    window_days: WindowDays | None = None
    downgrade_policy: Policy = "never"
    earn_multiplier_percent: MultiplierPercent = 100
    benefits: Benefits = Field(default_factory=list)
    active: bool = True

    @model_validator(mode="after")
    def _window_matches_basis(self) -> Self:
        check_window(self.basis, self.window_days)
        return self


class TierPatch(PatchInput):
    """Fields to change; the code is the tier's identity on members and cannot change."""

    not_nullable = (
        "name",
        "rank",
        "threshold",
        "basis",
        "downgrade_policy",
        "earn_multiplier_percent",
        "benefits",
        "active",
    )

    name: TierName | None = None
    rank: Rank | None = None
    threshold: Threshold | None = None
    basis: Basis | None = None
    window_days: WindowDays | None = Field(
        default=None, description="Send null to drop it when leaving the rolling basis."
    )
    downgrade_policy: Policy | None = None
    earn_multiplier_percent: MultiplierPercent | None = None
    benefits: Benefits | None = None
    active: bool | None = None


class TierOut(BaseModel):
    id: str
    code: str
    name: str
    rank: int
    threshold: int
    basis: str
    window_days: int | None
    downgrade_policy: str
    earn_multiplier_percent: int
    benefits: list[str]
    active: bool
    created_at: datetime
    updated_at: datetime


class TierAssignment(Input):
    member_id: Annotated[str, StringConstraints(pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$")]
    tier_code: Code | None = Field(description="The tier to set, or null to clear the tier.")
    until: UTCDatetime | None = Field(
        default=None,
        description=(
            "Keep the member at least at this tier until then; without it the floor holds "
            "until the next assignment."
        ),
    )
    reason: Annotated[LongText, StringConstraints(min_length=1)]


class TierAssignmentOut(BaseModel):
    member_id: str
    previous_tier: str | None
    tier: str | None
    floor_tier: str | None
    floor_until: datetime | None
