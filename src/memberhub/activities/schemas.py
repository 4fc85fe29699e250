from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints, model_validator

from memberhub.kit.types import Input, ShortText, UTCDatetime
from memberhub.members.schemas import CustomKey, OrganisationRef
from memberhub.memberships.schemas import Currency
from memberhub.points.schemas import MAX_AMOUNT, PublicIdRef

MAX_ITEMS = 100
MAX_TAGS = 20
MAX_CUSTOM = 20

ActivityType = Annotated[
    str,
    StringConstraints(max_length=100, pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*){0,4}$"),
    Field(description="What happened, e.g. `booking.completed`, `event.attended`."),
]
Source = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,99}$"),
    Field(description="Where it comes from, e.g. `eventbrite`, `booking-system`."),
]
SourceId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$"),
    Field(description="The source's id for it: a repeat with the same id is a replay."),
]
ExternalKey = Annotated[
    str,
    StringConstraints(max_length=241, pattern=r"^[a-z0-9][a-z0-9_-]{0,39}:[^\x00]{1,200}$"),
    Field(description="`SYSTEM:ID`: the member whose `external_ids` map SYSTEM to ID."),
]
Label = Annotated[ShortText, StringConstraints(min_length=1)]
Amount = Annotated[int, Field(ge=0, le=MAX_AMOUNT, description="Minor units.")]
CustomValue = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")]


class ActivityItem(Input):
    sku: Label | None = None
    name: Label | None = None
    category: Label | None = None
    quantity: int = Field(default=1, ge=1, le=1_000_000)
    amount: Amount | None = Field(default=None, description="The line's total, minor units.")


class ActivityAttributes(Input):
    """What earning rules can read about the activity. `amount` is in minor units of
    `currency`, and the two come together."""

    amount: Amount | None = None
    currency: Currency | None = None
    # What the customer paid, when in another currency than `currency` (an order of a shop
    # selling in several currencies); refunds in that currency are measured against it.
    paid_amount: Amount | None = None
    paid_currency: Currency | None = None
    quantity: int | None = Field(default=None, ge=1, le=1_000_000)
    items: list[ActivityItem] | None = Field(default=None, max_length=MAX_ITEMS)
    event_id: Label | None = None
    cpd_hours: float | None = Field(default=None, ge=0, le=1000)
    order_id: Label | None = None
    booking_id: Label | None = None
    category: Label | None = None
    channel: Label | None = None
    location: Label | None = None
    tags: list[Label] | None = Field(default=None, max_length=MAX_TAGS)
    custom: dict[CustomKey, CustomValue | int | bool] | None = Field(
        default=None, max_length=MAX_CUSTOM, description="Your own attributes."
    )

    @model_validator(mode="after")
    def _amount_with_currency(self) -> Self:
        if (self.amount is None) != (self.currency is None):
            raise ValueError("amount and currency are given together")
        if (self.paid_amount is None) != (self.paid_currency is None):
            raise ValueError("paid_amount and paid_currency are given together")
        for key, value in (self.custom or {}).items():
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_AMOUNT:
                raise ValueError(f"custom attribute {key!r} is outside the safe integer range")
        return self


class ActivityIn(Input):
    """An activity to record. The member is named by `member_id`, or found by
    `external_id`, then by `email`, among the members of the activity's organisation (and
    its chapters); one that matches nobody is kept as unmatched."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "booking.completed",
                    "occurred_at": "2026-03-14T10:30:00Z",
                    "source": "booking-system",
                    "source_id": "B-10042",
                    "email": "ana.silva@example.com",
                    "attributes": {"amount": 25000, "currency": "MYR", "category": "spa"},
                }
            ]
        }
    )

    type: ActivityType
    occurred_at: UTCDatetime
    source: Source
    source_id: SourceId
    member_id: PublicIdRef | None = None
    external_id: ExternalKey | None = None
    email: EmailStr | None = Field(default=None, max_length=320)
    organisation_id: OrganisationRef | None = Field(
        default=None,
        description="The organisation the activity belongs to; defaults to the API key's.",
    )
    attributes: ActivityAttributes = Field(default_factory=ActivityAttributes)

    @model_validator(mode="after")
    def _names_a_member(self) -> Self:
        if self.member_id is None and self.external_id is None and self.email is None:
            raise ValueError("give member_id, external_id or email")
        return self


class MatchRequest(Input):
    """Name the member, or leave it out to try matching again by the activity's key."""

    member_id: PublicIdRef | None = None


class CreditOut(BaseModel):
    rule_id: str
    rule_version: int
    effect: str
    points: int
    transaction_id: str | None


class ActivityOut(BaseModel):
    id: str
    type: str
    occurred_at: datetime
    source: str
    source_id: str
    organisation_id: str | None
    member_id: str | None
    status: str = Field(description="`matched`, or `unmatched` while no member has its key.")
    matched_by: str | None = Field(description="member_id, external_id, email or manual.")
    matched_at: datetime | None
    email: str | None = Field(description="The key it waits with, while unmatched.")
    external_id: str | None = Field(description="The key it waits with, while unmatched.")
    attributes: dict[str, Any]
    credits: list[CreditOut] = Field(description="What earning rules did for it.")
    lead_id: str | None = Field(
        default=None,
        description="The lead it made (or found) while unmatched, where the program's "
        "`unmatched_activity_leads` says so.",
    )
    recorded_at: datetime


class ActivityResult(BaseModel):
    activity: ActivityOut
    replayed: bool = Field(description="True when the source id was recorded before.")
