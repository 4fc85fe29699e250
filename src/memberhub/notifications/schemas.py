from __future__ import annotations

import re
from datetime import datetime, time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    EmailStr,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from memberhub.kit.types import Input, Name, PatchInput
from memberhub.program.schemas import TimeZoneName

ChannelName = Literal["email", "sms", "push"]
RoleName = Literal["admin", "manager", "support_agent"]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _canonical_locale(tag: str) -> str:
    """A BCP 47 tag in its usual case: "pt-br" is "pt-BR", "zh-hant-tw" is "zh-Hant-TW"."""
    language, *subtags = tag.split("-")
    shaped = [
        part.upper()
        if len(part) == 2 or (len(part) == 3 and part.isdigit())
        else part.title()
        if len(part) == 4 and part.isalpha()
        else part.lower()
        for part in subtags
    ]
    return "-".join([language.lower(), *shaped])


# BCP 47 language tags as used in practice: "en", "en-GB", "pt-BR", "zh-Hant-TW"; kept in
# their usual case, so two spellings of one tag are one locale.
Locale = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$", max_length=35),
    AfterValidator(_canonical_locale),
]
TemplateSubject = Annotated[
    str, StringConstraints(min_length=1, max_length=998), AfterValidator(_no_nul)
]
TemplateBody = Annotated[
    str, StringConstraints(min_length=1, max_length=100_000), AfterValidator(_no_nul)
]
MessageTypeName = Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,60}$")]
ClockTime = Annotated[str, StringConstraints(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]


class StaffRecipient(Input):
    """A member of staff who receives staff messages: those of the message types whose
    roles include one of theirs."""

    email: EmailStr
    name: Name | None = None
    roles: list[RoleName] = Field(min_length=1, max_length=3)


class QuietHours(Input):
    """When SMS and push wait: from `start` to `end` in the member's time zone (their
    preference, else the program's). An empty window (start equal to end) turns it off."""

    start: ClockTime = "21:00"
    end: ClockTime = "08:00"

    def window(self) -> tuple[time, time]:
        return time.fromisoformat(self.start), time.fromisoformat(self.end)


class NotificationSettings(Input):
    program_name: Name = Field(default="Our loyalty program", description="`program.name`.")
    default_locale: Locale = Field(
        default="en", description="Templates fall back to this locale, then to the defaults."
    )
    staff: list[StaffRecipient] = Field(default_factory=list, max_length=200)
    quiet_hours: QuietHours = Field(default_factory=QuietHours)
    renewal_due_days: list[int] = Field(
        default_factory=lambda: [30, 7],
        max_length=10,
        description="Days before a term ends that `membership.renewal_due` announces it.",
    )
    dedup_window_minutes: int = Field(
        default=0,
        ge=0,
        le=60 * 24 * 30,
        description="A member gets one message of a type per channel within this window; "
        "0 turns deduplication off.",
    )
    dedup_windows: dict[MessageTypeName, Annotated[int, Field(ge=0, le=60 * 24 * 30)]] = Field(
        default_factory=dict, max_length=50, description="Per message type overrides."
    )
    disabled_message_types: list[MessageTypeName] = Field(default_factory=list, max_length=50)
    retry_delays_seconds: list[Annotated[int, Field(ge=1, le=7 * 86400)]] = Field(
        default_factory=lambda: [60, 300, 1800, 7200, 21600],
        min_length=1,
        max_length=20,
        description="Waits before each new attempt after a temporary failure; after the "
        "last, the notification fails.",
    )

    @field_validator("renewal_due_days")
    @classmethod
    def _days(cls, days: list[int]) -> list[int]:
        for value in days:
            if isinstance(value, bool) or not 1 <= value <= 365:
                raise ValueError("each value must be between 1 and 365")
        return sorted(set(days))


class NotificationSettingsPatch(PatchInput):
    not_nullable = (
        "program_name",
        "default_locale",
        "staff",
        "quiet_hours",
        "renewal_due_days",
        "dedup_window_minutes",
        "dedup_windows",
        "disabled_message_types",
        "retry_delays_seconds",
    )

    program_name: Name | None = None
    default_locale: Locale | None = None
    staff: list[StaffRecipient] | None = Field(default=None, max_length=200)
    quiet_hours: QuietHours | None = None
    renewal_due_days: list[int] | None = Field(default=None, max_length=10)
    dedup_window_minutes: int | None = Field(default=None, ge=0, le=60 * 24 * 30)
    dedup_windows: dict[MessageTypeName, Annotated[int, Field(ge=0, le=60 * 24 * 30)]] | None = (
        Field(default=None, max_length=50)
    )
    disabled_message_types: list[MessageTypeName] | None = Field(default=None, max_length=50)
    retry_delays_seconds: list[Annotated[int, Field(ge=1, le=7 * 86400)]] | None = Field(
        default=None, min_length=1, max_length=20
    )


class NotificationSettingsOut(NotificationSettings):
    updated_at: datetime | None


class TemplateIn(Input):
    message_type: MessageTypeName
    channel: ChannelName
    locale: Locale
    subject: TemplateSubject | None = Field(
        default=None, description="Email subject or push title; required for email."
    )
    body: TemplateBody
    format: Literal["text", "html"] = Field(
        default="text", description="html: email only; its plain-text part is made from it."
    )
    enabled: bool = True


class TemplatePatch(PatchInput):
    not_nullable = ("body", "format", "enabled")

    subject: TemplateSubject | None = None
    body: TemplateBody | None = None
    format: Literal["text", "html"] | None = None
    enabled: bool | None = None


class TemplateOut(BaseModel):
    id: str | None = Field(description="None for a built-in default.")
    message_type: str
    channel: str
    locale: str | None = Field(description="None for a built-in default.")
    subject: str | None
    body: str
    format: str
    enabled: bool
    default: bool
    created_at: datetime | None
    updated_at: datetime | None


class PreviewIn(Input):
    member_id: str | None = Field(
        default=None,
        pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$",
        max_length=45,
        description="Render for this member (member messages); sample data otherwise.",
    )
    event: dict[str, Any] | None = Field(
        default=None, description="Event data to render with, instead of sample data."
    )


class PreviewRequest(Input):
    message_type: MessageTypeName
    channel: ChannelName
    locale: Locale | None = Field(
        default=None,
        description="Which template: the installation's in this locale (by default, with "
        "a member_id, the member's own, as sending does), else in the default locale, else "
        "the built-in one.",
    )
    subject: TemplateSubject | None = Field(default=None, description="A draft to render.")
    body: TemplateBody | None = Field(
        default=None, description="A draft to render instead of the stored template."
    )
    format: Literal["text", "html"] = "text"
    member_id: str | None = Field(
        default=None, pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$", max_length=45
    )
    event: dict[str, object] | None = None


class PreviewOut(BaseModel):
    subject: str | None
    text: str
    html: str | None


class MessageTypeOut(BaseModel):
    name: str
    audience: str
    category: str
    event_type: str
    description: str
    channels: list[str] = Field(description="Channels with a default template.")
    staff_roles: list[str]
    variables: list[str]


class PreferencesOut(BaseModel):
    member_id: str
    email: bool = Field(description="The member's email consent.")
    sms: bool = Field(description="The member's SMS consent.")
    push: bool
    marketing_email: bool
    marketing_sms: bool
    marketing_push: bool
    locale: str | None
    timezone: str | None
    updated_at: datetime | None


class PreferencesPatch(PatchInput):
    """Email and SMS consent are the member's (`consent` of the member); push consent and
    the categories are set here."""

    not_nullable = ("push", "marketing_email", "marketing_sms", "marketing_push")

    push: bool | None = None
    marketing_email: bool | None = None
    marketing_sms: bool | None = None
    marketing_push: bool | None = None
    locale: Locale | None = None
    timezone: TimeZoneName | None = None


DeviceTokenValue = Annotated[
    str, StringConstraints(min_length=8, max_length=4096, pattern=r"^[\x21-\x7e]+$")
]


class DeviceIn(Input):
    token: DeviceTokenValue
    platform: Literal["ios", "android", "web"]


class DeviceOut(BaseModel):
    id: str
    member_id: str
    platform: str
    token: str
    created_at: datetime


class NotificationOut(BaseModel):
    id: str
    event_id: str
    message_type: str
    category: str
    channel: str
    audience: str
    member_id: str | None
    recipient: str | None
    locale: str | None
    subject: str | None
    status: str = Field(
        description="queued, sent, delivered, bounced, failed or suppressed (see `reason`)."
    )
    reason: str | None
    error: str | None
    attempts: int
    next_attempt_at: datetime | None
    integration_id: str | None
    provider_message_id: str | None
    created_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None


class SuppressionOut(BaseModel):
    id: str
    channel: str
    address: str
    reason: str
    source: str | None
    created_at: datetime


class SuppressionIn(Input):
    channel: ChannelName
    address: Annotated[str, StringConstraints(min_length=3, max_length=320, strip_whitespace=True)]
    reason: Literal["manual", "bounced", "spam_report", "unsubscribed", "dropped"] = "manual"

    @model_validator(mode="after")
    def _address_fits_channel(self) -> SuppressionIn:
        """An address the channel could never send to would suppress nothing."""
        if self.channel == "sms" and not _PHONE.fullmatch(normalise_address("sms", self.address)):
            raise ValueError("an sms address is a phone number: digits, optionally after +")
        if self.channel == "email" and "@" not in self.address:
            raise ValueError("an email address has an @")
        return self


# A phone number as compared: optional +, then 6 to 15 digits (E.164 allows 15).
_PHONE = re.compile(r"\+?[0-9]{6,15}")


def listed_as(channel: str, recipient: str | None, recipient_key: str) -> str:
    """How the suppression list names a recipient: its normalised address or number
    (`recipient_key`), or for a push the device token (a push's key names the device)."""
    if channel == "push":
        return recipient or ""
    return recipient_key


def normalise_address(channel: str, address: str) -> str:
    """The form addresses are compared in: emails lower-cased, numbers without spacing."""
    address = address.strip()
    if channel == "email":
        return address.lower()
    if channel == "sms":
        return re.sub(r"[\s().-]", "", address)
    return address
