from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.schema import UniqueConstraint

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class Channel:
    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"

    ALL = (EMAIL, SMS, PUSH)


class Category:
    TRANSACTIONAL = "transactional"
    MARKETING = "marketing"

    ALL = (TRANSACTIONAL, MARKETING)


class NotificationStatus:
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    FAILED = "failed"
    SUPPRESSED = "suppressed"

    ALL = (QUEUED, SENT, DELIVERED, BOUNCED, FAILED, SUPPRESSED)


class Notification(IdMixin, Base):
    """One message to one recipient on one channel: the notification outbox and its log.

    Made from a committed event by the planner (`notifications/planning.py`); the unique
    (event, recipient, channel) key makes that exactly once however often an event is
    read. The sender leases a queued row by moving `next_attempt_at` to the end of its
    lease and bumping `attempts`; a row whose sender died is due again when the lease runs
    out, and a result is recorded only by the holder of the current lease (`claim`).
    """

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("event_public_id", "recipient_key", "channel"),
        # The sender's queue: queued rows by when they are due.
        Index(
            "ix_notifications_due",
            "next_attempt_at",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        Index("ix_notifications_member_type", "member_id", "message_type", "created_at"),
        Index("ix_notifications_provider_message_id", "provider_message_id"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    event_public_id: Mapped[str] = mapped_column(String(32))
    message_type: Mapped[str] = mapped_column(String(60), index=True)
    category: Mapped[str] = mapped_column(String(20))
    channel: Mapped[str] = mapped_column(String(10))
    audience: Mapped[str] = mapped_column(String(10))  # member or staff
    member_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="SET NULL")
    )
    organisation_id: Mapped[int | None] = mapped_column(BigIntId, index=True)
    # The address, number or device token; `recipient_key` is its normalised form.
    recipient: Mapped[str | None] = mapped_column(String(4096))
    recipient_key: Mapped[str] = mapped_column(String(200))
    locale: Mapped[str | None] = mapped_column(String(35))
    subject: Mapped[str | None] = mapped_column(String(998))
    text: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str | None] = mapped_column(Text)
    headers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), index=True)
    # Why it was suppressed or failed: no_consent, no_address, suppressed_address, ….
    reason: Mapped[str | None] = mapped_column(String(100))
    error: Mapped[str | None] = mapped_column(String(2000))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    # The current lease: who may record this attempt's result.
    claim: Mapped[str | None] = mapped_column(String(32))
    integration_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="SET NULL")
    )
    provider_message_id: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column()
    delivered_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class NotificationTemplate(IdMixin, Base):
    """An installation's own template for a message type, channel and locale; where there
    is none, the built-in default (`notifications/catalog.py`) is used."""

    __tablename__ = "notification_templates"
    __table_args__ = (UniqueConstraint("message_type", "channel", "locale"),)

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    message_type: Mapped[str] = mapped_column(String(60))
    channel: Mapped[str] = mapped_column(String(10))
    locale: Mapped[str] = mapped_column(String(35))
    subject: Mapped[str | None] = mapped_column(String(998))
    body: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(10), default="text")  # text or html
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class NotificationPreference(Base):
    """A member's notification preferences. Email and SMS consent are the member's own
    consent flags; push consent and the per-category choices live here."""

    __tablename__ = "notification_preferences"

    member_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="CASCADE"), primary_key=True
    )
    push: Mapped[bool] = mapped_column(Boolean, default=False)
    marketing_email: Mapped[bool] = mapped_column(Boolean, default=True)
    marketing_sms: Mapped[bool] = mapped_column(Boolean, default=True)
    marketing_push: Mapped[bool] = mapped_column(Boolean, default=True)
    locale: Mapped[str | None] = mapped_column(String(35))
    timezone: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeviceToken(IdMixin, Base):
    """A push token of one of a member's devices."""

    __tablename__ = "device_tokens"
    __table_args__ = (
        UniqueConstraint("member_id", "token"),
        # A token is found by itself when it moves to another member or is forgotten; a
        # hash index on PostgreSQL, which has no size limit on the long tokens.
        Index("ix_device_tokens_token", "token", postgresql_using="hash"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    member_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="CASCADE"), index=True
    )
    token: Mapped[str] = mapped_column(String(4096))
    platform: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Suppression(IdMixin, Base):
    """An address nothing is sent to any more: it bounced, reported spam or unsubscribed."""

    __tablename__ = "notification_suppressions"
    __table_args__ = (UniqueConstraint("channel", "address"),)

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    channel: Mapped[str] = mapped_column(String(10))
    address: Mapped[str] = mapped_column(String(320))  # normalised
    reason: Mapped[str] = mapped_column(String(40))
    source: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NotificationSettingsRow(Base):
    """The installation's notification settings: one row, id 1 (`schemas.NotificationSettings`)."""

    __tablename__ = "notification_settings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class NotificationFeedState(Base):
    """Where the planner is in the event feed: one row, id 1. Advanced in the transaction
    that writes the notifications of the events it passes."""

    __tablename__ = "notification_feed_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_position: Mapped[int] = mapped_column(BigInteger, default=0)


class RenewalNotice(IdMixin, Base):
    """A `membership.renewal_due` already announced for one term end and notice period."""

    __tablename__ = "renewal_notices"
    __table_args__ = (UniqueConstraint("member_id", "term_ends_at", "days_before"),)

    member_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="CASCADE"), index=True
    )
    term_ends_at: Mapped[datetime] = mapped_column()
    days_before: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
