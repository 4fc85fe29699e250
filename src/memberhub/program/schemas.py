from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Annotated, Literal
from zoneinfo import available_timezones

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from memberhub.kit.types import Input, PatchInput
from memberhub.memberships.schemas import Currency

MAX_POINTS = 10**12


@cache
def _portable_zones() -> frozenset[str]:
    """The IANA zone names, less those that mean something else on each host: "localtime"
    (whatever zone the host is set to) and "Factory" (no zone at all). Names such as
    "posixrules" or "right/UTC", which a host's zone files may hold, are not among them."""
    return frozenset(available_timezones()) - {"localtime", "Factory"}


def _known_zone(value: str) -> str:
    if value not in _portable_zones():
        raise ValueError(f"'{value}' is not an IANA time zone such as 'Asia/Kuala_Lumpur'")
    return value


TimeZoneName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_known_zone)]
Limit = Annotated[int | None, Field(ge=0, le=MAX_POINTS)]


class RoleLimit(Input):
    """Per-operation point limits for one role. `None` means no limit.

    An award above `award` is refused; a deduction above `deduct` becomes an approval request.
    """

    award: Limit = None
    deduct: Limit = None


class RoleLimits(Input):
    # Seed defaults: support agents award under 1,000 and deduct nothing without approval;
    # managers award any amount and deduct under 5,000; admins have no limit.
    support_agent: RoleLimit = RoleLimit(award=999, deduct=0)
    manager: RoleLimit = RoleLimit(award=None, deduct=4999)
    admin: RoleLimit = RoleLimit(award=None, deduct=None)
    integration: RoleLimit = RoleLimit(award=0, deduct=0)


class AlertThresholds(Input):
    points_expiring_days: int = Field(default=30, ge=1, le=365)
    points_expiring_min_points: int = Field(default=1, ge=1, le=MAX_POINTS)
    large_redemption_points: int = Field(default=10_000, ge=1, le=MAX_POINTS)
    high_expiration_rate_percent: float = Field(default=20.0, ge=0, le=100)
    low_redemption_rate_percent: float = Field(default=5.0, ge=0, le=100)


# An activity source, as `activities.schemas.Source` spells it.
ActivitySource = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,99}$")]
MAX_LEAD_SOURCES = 50


class UnmatchedActivityLeads(Input):
    """What an activity that matches no member does besides waiting for one. With
    `enabled`, one that carries an email makes a lead in the activity's organisation (or
    finds the one not yet enrolled with that email there), whose `source` is the
    activity's; `sources` limits this to activities from those sources (null: any)."""

    enabled: bool = False
    sources: list[ActivitySource] | None = Field(
        default=None, min_length=1, max_length=MAX_LEAD_SOURCES
    )


ExpiryPolicyName = Literal["never", "days_after_earn", "end_of_month_after_days", "fixed_date"]
NegativePolicyName = Literal["forbid", "allow_for_reversals"]


class ProgramFields(BaseModel):
    currency: Currency
    earn_points: int = Field(ge=0, le=1_000_000, description="Points per `earn_per_amount`.")
    earn_per_amount: int = Field(
        ge=1, le=10**12, description="Minor currency units that earn `earn_points` points."
    )
    expiry_policy: ExpiryPolicyName
    expiry_days: int | None = Field(default=None, ge=0, le=36_500)
    expiry_fixed_month: int | None = Field(default=None, ge=1, le=12)
    expiry_fixed_day: int | None = Field(default=None, ge=1, le=31)
    pending_days: int = Field(ge=0, le=365)
    negative_balance_policy: NegativePolicyName
    timezone: TimeZoneName
    expiring_notice_days: int = Field(ge=1, le=365)
    point_value_amount: int = Field(ge=0, le=10**12)
    point_value_points: int = Field(ge=1, le=10**9)
    role_limits: RoleLimits
    alert_thresholds: AlertThresholds
    unmatched_activity_leads: UnmatchedActivityLeads


def check_expiry_fields(fields: ProgramFields) -> ProgramFields:
    needs_days = fields.expiry_policy in ("days_after_earn", "end_of_month_after_days")
    if needs_days and fields.expiry_days is None:
        raise ValueError(f"expiry_policy '{fields.expiry_policy}' needs expiry_days")
    if fields.expiry_policy == "fixed_date":
        if fields.expiry_fixed_month is None or fields.expiry_fixed_day is None:
            raise ValueError("expiry_policy 'fixed_date' needs expiry_fixed_month and _day")
        days_in_month = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
        if fields.expiry_fixed_day > days_in_month[fields.expiry_fixed_month - 1]:
            raise ValueError("expiry_fixed_day does not exist in expiry_fixed_month")
    return fields


class ProgramOut(ProgramFields):
    updated_at: datetime | None = Field(
        description="When the settings last changed; null while they are the defaults, never saved."
    )


class ProgramPatch(PatchInput):
    """Change any subset of the settings; the result is validated as a whole. Only the
    expiry days and fixed date may be set to null."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})
    not_nullable = (
        "currency",
        "earn_points",
        "earn_per_amount",
        "expiry_policy",
        "pending_days",
        "negative_balance_policy",
        "timezone",
        "expiring_notice_days",
        "point_value_amount",
        "point_value_points",
        "role_limits",
        "alert_thresholds",
        "unmatched_activity_leads",
    )

    currency: Currency | None = None
    earn_points: int | None = Field(default=None, ge=0, le=1_000_000)
    earn_per_amount: int | None = Field(default=None, ge=1, le=10**12)
    expiry_policy: ExpiryPolicyName | None = None
    expiry_days: int | None = Field(default=None, ge=0, le=36_500)
    expiry_fixed_month: int | None = Field(default=None, ge=1, le=12)
    expiry_fixed_day: int | None = Field(default=None, ge=1, le=31)
    pending_days: int | None = Field(default=None, ge=0, le=365)
    negative_balance_policy: NegativePolicyName | None = None
    timezone: TimeZoneName | None = None
    expiring_notice_days: int | None = Field(default=None, ge=1, le=365)
    point_value_amount: int | None = Field(default=None, ge=0, le=10**12)
    point_value_points: int | None = Field(default=None, ge=1, le=10**9)
    role_limits: RoleLimits | None = None
    alert_thresholds: AlertThresholds | None = None
    unmatched_activity_leads: UnmatchedActivityLeads | None = None

    @model_validator(mode="after")
    def _changes_something(self) -> ProgramPatch:
        if not self.model_fields_set:
            raise ValueError("send at least one setting to change")
        return self
