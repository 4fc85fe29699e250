from __future__ import annotations

from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Boolean, Date, ForeignKey, Index, Integer, String, func, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin

if TYPE_CHECKING:
    from memberhub.memberships.models import MembershipPlan
    from memberhub.organisations.models import Organisation


class MemberStatus:
    PENDING = "pending"
    ACTIVE = "active"
    GRACE = "grace"
    LAPSED = "lapsed"
    SUSPENDED = "suspended"
    CANCELLED = "cancelled"

    ALL = (PENDING, ACTIVE, GRACE, LAPSED, SUSPENDED, CANCELLED)


# How a member's public id begins (`new_public_id("mem")`): a value naming a member.
MEMBER_ID_PREFIX = "mem_"


class Member(IdMixin, Base):
    __tablename__ = "members"
    __table_args__ = (
        # Email is unique per organisation, compared case-insensitively; members without an
        # organisation share one scope (0).
        Index(
            "uq_members_organisation_email",
            func.coalesce(text("organisation_id"), 0),
            "email_normalized",
            unique=True,
        ),
        Index("ix_members_status_term_ends_at", "status", "term_ends_at"),
        Index("ix_members_status_grace_ends_at", "status", "grace_ends_at"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    organisation_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("organisations.id", ondelete="RESTRICT"), index=True
    )
    email: Mapped[str | None] = mapped_column(String(320))
    email_normalized: Mapped[str | None] = mapped_column(String(320), index=True)
    first_name: Mapped[str | None] = mapped_column(String(100))
    last_name: Mapped[str | None] = mapped_column(String(100))
    phone: Mapped[str | None] = mapped_column(String(40))
    date_of_birth: Mapped[date | None] = mapped_column(Date)
    # Queried by status through ix_members_status_term_ends_at (its first column).
    status: Mapped[str] = mapped_column(String(20), default=MemberStatus.PENDING)
    tier: Mapped[str | None] = mapped_column(String(50), index=True)

    consent_email: Mapped[bool] = mapped_column(Boolean, default=False)
    consent_sms: Mapped[bool] = mapped_column(Boolean, default=False)
    consent_analytics: Mapped[bool] = mapped_column(Boolean, default=False)
    consent_profiling: Mapped[bool] = mapped_column(Boolean, default=False)
    # Purposes (see `members/consent.py`): pushing the member to CRMs, marketing email.
    consent_crm: Mapped[bool] = mapped_column(Boolean, default=False)
    consent_marketing_email: Mapped[bool] = mapped_column(Boolean, default=False)
    custom_fields: Mapped[dict[str, Any]] = mapped_column(default=dict)
    external_ids: Mapped[dict[str, Any]] = mapped_column(default=dict)

    # Membership state, denormalised from the current term for the scheduled transitions.
    plan_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("membership_plans.id", ondelete="RESTRICT")
    )
    member_since: Mapped[datetime | None] = mapped_column()
    term_ends_at: Mapped[datetime | None] = mapped_column()
    grace_ends_at: Mapped[datetime | None] = mapped_column()
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False)
    status_before_suspension: Mapped[str | None] = mapped_column(String(20))
    # Reported by the payments integration (see memberhub.integrations.payments).
    payment_status: Mapped[str | None] = mapped_column(String(20))
    payment_updated_at: Mapped[datetime | None] = mapped_column()

    # Seals the member's personal data in its audit entries; erasing the member deletes it
    # (see `members.personal`). None for a member erased, or created before keys existed.
    data_key: Mapped[str | None] = mapped_column(String(64))

    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column()

    organisation: Mapped[Organisation | None] = relationship(lazy="raise")
    plan: Mapped[MembershipPlan | None] = relationship(lazy="raise")

    __mapper_args__ = {"version_id_col": version}


class ConsentChange(IdMixin, Base):
    """One change of one consent flag: who changed it, when, from where. Written in the
    transaction that changes the flag (`members/consent.py`), never updated."""

    __tablename__ = "consent_changes"
    __table_args__ = (Index("ix_consent_changes_member_id_id", "member_id", "id"),)

    member_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("members.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    granted: Mapped[bool] = mapped_column(Boolean)
    # An API key, staff user, integration or "system"; what `Actor.id` says.
    actor: Mapped[str] = mapped_column(String(64))
    # api, console, import, crm, vendor_webhook, erasure, migration
    source: Mapped[str] = mapped_column(String(32))
    client_ip: Mapped[str | None] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)
