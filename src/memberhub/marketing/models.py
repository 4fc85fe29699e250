from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin, JSONType


class MarketingSyncState(Base):
    """Where a marketing-list integration stands: the last feed position whose changes
    reached the audience, when everything was last compared, and how the last attempts went.
    `lease_until` keeps a second worker off an integration being synced."""

    __tablename__ = "marketing_sync_states"

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE"), primary_key=True
    )
    event_position: Mapped[int] = mapped_column(BigInteger, default=0)
    # The audience the contacts and segments below were written to: another one in the
    # settings starts over with a full comparison.
    list_id: Mapped[str | None] = mapped_column(String(50))
    full_requested_at: Mapped[datetime | None] = mapped_column()
    last_full_sync_at: Mapped[datetime | None] = mapped_column()
    last_synced_at: Mapped[datetime | None] = mapped_column()
    last_segments_at: Mapped[datetime | None] = mapped_column()
    segments_fingerprint: Mapped[str | None] = mapped_column(String(64))
    members_written: Mapped[int] = mapped_column(BigInteger, default=0)
    last_run_writes: Mapped[int] = mapped_column(Integer, default=0)
    last_run_requests: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(1000))
    last_error_at: Mapped[datetime | None] = mapped_column()
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    lease_until: Mapped[datetime | None] = mapped_column()


class ContactStatus:
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"
    CLEANED = "cleaned"  # the vendor dropped the address (bounces, abuse): never sent again


class MarketingContact(IdMixin, Base):
    """One member as the integration's audience holds them: the status and a hash of the
    content last written, so a member whose content is unchanged is not written again."""

    __tablename__ = "marketing_contacts"
    __table_args__ = (
        Index("uq_marketing_contacts_member", "integration_id", "member_id", unique=True),
        Index("ix_marketing_contacts_email", "integration_id", "email"),
    )

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE")
    )
    member_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("members.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(320))  # lower-cased, as last written
    status: Mapped[str] = mapped_column(String(20))
    content_hash: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(String(500))
    synced_at: Mapped[datetime] = mapped_column(default=utcnow)


class MarketingSegment(IdMixin, Base):
    """A segment defined in the integration's settings, as kept at the vendor: its id
    there and the addresses it was last given."""

    __tablename__ = "marketing_segments"
    __table_args__ = (Index("uq_marketing_segments_key", "integration_id", "key", unique=True),)

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE")
    )
    key: Mapped[str] = mapped_column(String(60))
    name: Mapped[str] = mapped_column(String(100))
    remote_id: Mapped[str | None] = mapped_column(String(50))
    emails: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    synced_at: Mapped[datetime | None] = mapped_column()


class FiringStatus:
    PENDING = "pending"
    SENT = "sent"
    SKIPPED = "skipped"  # no consent, or not on the audience: never sent
    FAILED = "failed"  # refused by the vendor, or out of attempts


class JourneyFiring(IdMixin, Base):
    """A journey rule's firing for one member: at most one per member and rule, whatever
    the number of events that match it."""

    __tablename__ = "marketing_journey_firings"
    __table_args__ = (
        Index(
            "uq_marketing_journey_firings_rule_member",
            "integration_id",
            "rule_key",
            "member_id",
            unique=True,
        ),
        Index("ix_marketing_journey_firings_status", "integration_id", "status"),
    )

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE")
    )
    rule_key: Mapped[str] = mapped_column(String(60))
    member_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("members.id", ondelete="CASCADE"))
    event_position: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(10), default=FiringStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    fired_at: Mapped[datetime | None] = mapped_column()
