from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class MembershipPlan(IdMixin, Base):
    __tablename__ = "membership_plans"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    organisation_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("organisations.id", ondelete="RESTRICT"), index=True
    )
    code: Mapped[str] = mapped_column(String(50), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    term_months: Mapped[int] = mapped_column(Integer)
    price_amount: Mapped[int] = mapped_column(BigInteger)  # minor units
    currency: Mapped[str] = mapped_column(String(3))
    grace_days: Mapped[int] = mapped_column(Integer, default=0)
    renewal_window_days: Mapped[int] = mapped_column(Integer, default=30)
    auto_renew: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class MembershipTerm(IdMixin, Base):
    """One paid period of a member on a plan; renewals append terms."""

    __tablename__ = "membership_terms"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    member_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="CASCADE"), index=True
    )
    plan_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("membership_plans.id", ondelete="RESTRICT")
    )
    kind: Mapped[str] = mapped_column(String(20))  # join / renew / upgrade
    starts_at: Mapped[datetime] = mapped_column()
    ends_at: Mapped[datetime] = mapped_column()
    ended_early_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MemberStatusChange(IdMixin, Base):
    __tablename__ = "member_status_changes"

    member_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="CASCADE"), index=True
    )
    from_status: Mapped[str] = mapped_column(String(20))
    to_status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(String(30))
    note: Mapped[str | None] = mapped_column(String(1000))
    actor: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)
