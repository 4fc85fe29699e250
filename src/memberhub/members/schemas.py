from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic_core import PydanticCustomError

from memberhub.kit.types import Input, ISODate, LongText, Name, PatchInput

ExternalSystem = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")]
ExternalId = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]
CustomKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


def _born(value: date) -> date:
    """A date of birth that can be one: not after today (anywhere on Earth: a day's grace on
    UTC) and not before 1900."""
    if value > datetime.now(UTC).date() + timedelta(days=1):
        raise ValueError("a date of birth cannot be in the future")
    if value < date(1900, 1, 1):
        raise ValueError("a date of birth cannot be before 1900-01-01")
    return value


BirthDate = Annotated[ISODate, AfterValidator(_born)]
CustomValue = LongText | bool | int | None
MIN_PHONE_DIGITS = 3


def _has_digits(value: str) -> str:
    """A phone number is its digits; the spaces and punctuation only group them, so
    "--- ()" is no number at all. Three is the shortest that is dialled (112)."""
    if sum(character.isdigit() for character in value) < MIN_PHONE_DIGITS:
        raise PydanticCustomError(
            "phone_digits",
            "A phone number needs at least {digits} digits.",
            {"digits": MIN_PHONE_DIGITS},
        )
    return value


# Digits, grouped as people write them (spaces, ( ) . / -), an optional leading +.
Phone = Annotated[
    str,
    StringConstraints(strip_whitespace=True, pattern=r"^\+?[0-9 ()./-]{3,39}$"),
    AfterValidator(_has_digits),
]

OrganisationRef = Annotated[str, StringConstraints(min_length=1, max_length=45)]

MAX_CUSTOM_FIELDS = 50
MAX_EXTERNAL_IDS = 20
# Keep integers inside what every JSON consumer (and JavaScript) reads exactly.
_SAFE_INT = 2**53 - 1


def check_custom_fields(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if len(value) > MAX_CUSTOM_FIELDS:
        raise ValueError(f"at most {MAX_CUSTOM_FIELDS} custom fields are allowed")
    for key, item in value.items():
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > _SAFE_INT:
            raise ValueError(f"custom field {key!r} is outside the safe integer range")
    return value


class Consent(Input):
    """Consent by purpose (see the README's Consent section); every change is kept in the
    member's consent history."""

    email: bool = Field(default=False, description="Notifications by email.")
    sms: bool = Field(default=False, description="Notifications by SMS.")
    analytics: bool = Field(default=False, description="Events sent to analytics (GA4, Segment).")
    profiling: bool = Field(default=False, description="Profiling and behavioural segments.")
    crm: bool = Field(default=False, description="Pushed to the connected CRMs.")
    marketing_email: bool = Field(
        default=False, description="On marketing email lists (Mailchimp audiences)."
    )


class ConsentPatch(PatchInput):
    not_nullable = ("email", "sms", "analytics", "profiling", "crm", "marketing_email")

    email: bool | None = None
    sms: bool | None = None
    analytics: bool | None = None
    profiling: bool | None = None
    crm: bool | None = None
    marketing_email: bool | None = None


class ConsentChangeOut(BaseModel):
    purpose: str
    granted: bool
    actor: str = Field(description="The API key, staff user, integration or job that changed it.")
    source: str = Field(
        description="api, console, import, crm, vendor_webhook, erasure or migration."
    )
    client_ip: str | None
    occurred_at: datetime


class MemberCreate(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "email": "ana.silva@example.com",
                    "first_name": "Ana",
                    "last_name": "Silva",
                    "phone": "+351912345678",
                    "consent": {"email": True, "sms": False, "analytics": True, "profiling": False},
                    "custom_fields": {"employer": "Acme"},
                    "external_ids": {"salesforce": "0035g00000XyZ1"},
                }
            ]
        }
    )

    email: EmailStr = Field(max_length=320)
    first_name: Name | None = None
    last_name: Name | None = None
    phone: Phone | None = None
    date_of_birth: BirthDate | None = None
    organisation_id: OrganisationRef | None = Field(
        default=None, description="Defaults to the API key's organisation, if it has one."
    )
    consent: Consent = Field(default_factory=Consent)
    custom_fields: dict[CustomKey, CustomValue] = Field(default_factory=dict)
    external_ids: dict[ExternalSystem, ExternalId] = Field(
        default_factory=dict, max_length=MAX_EXTERNAL_IDS
    )

    _custom = field_validator("custom_fields")(check_custom_fields)


class MemberPatch(PatchInput):
    """Fields to change; for `custom_fields` and `external_ids` a null value removes a key."""

    not_nullable = ("email", "consent", "custom_fields", "external_ids")

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"first_name": "Ana Maria", "consent": {"sms": True}}]}
    )

    email: EmailStr | None = Field(default=None, max_length=320)
    first_name: Name | None = None
    last_name: Name | None = None
    phone: Phone | None = None
    date_of_birth: BirthDate | None = None
    organisation_id: OrganisationRef | None = Field(
        default=None, description="Move the member; null detaches it (unbound keys only)."
    )
    consent: ConsentPatch | None = None
    custom_fields: dict[CustomKey, CustomValue] | None = None
    external_ids: dict[ExternalSystem, ExternalId | None] | None = Field(
        default=None, max_length=MAX_EXTERNAL_IDS
    )

    _custom = field_validator("custom_fields")(check_custom_fields)


class MembershipState(BaseModel):
    plan_id: str | None
    member_since: datetime | None
    term_ends_at: datetime | None
    grace_ends_at: datetime | None
    cancel_at_period_end: bool
    payment_status: str | None = Field(
        default=None,
        description="The last payment's state as the payments integration reports it: paid, "
        "past_due, refunded, partially_refunded or cancelled; null when none reported.",
    )
    payment_updated_at: datetime | None = None


class MemberOut(BaseModel):
    id: str
    organisation_id: str | None
    email: str | None
    first_name: str | None
    last_name: str | None
    phone: str | None
    date_of_birth: date | None
    status: str
    tier: str | None
    consent: Consent
    custom_fields: dict[str, Any]
    external_ids: dict[str, str]
    membership: MembershipState
    version: int
    created_at: datetime
    updated_at: datetime
