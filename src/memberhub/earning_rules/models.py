from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class EarningRule(IdMixin, Base):
    """A rule staff define: when an activity meets `conditions`, `effect` credits points
    (or extends expiry), within `caps`. The row holds the current version; every version
    is kept in `earning_rule_versions`. Archived rules are never evaluated again."""

    __tablename__ = "earning_rules"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(String(1000))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Higher first; equal priorities in the order the rules were created.
    priority: Mapped[int] = mapped_column(Integer, default=0)
    stop_processing: Mapped[bool] = mapped_column(Boolean, default=False)
    # The condition tree (`earning_rules/conditions.py`); {} holds for every activity.
    conditions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    effect: Mapped[dict[str, Any]] = mapped_column(default=dict)
    caps: Mapped[dict[str, Any]] = mapped_column(default=dict)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    archived_at: Mapped[datetime | None] = mapped_column()


class EarningRuleVersion(IdMixin, Base):
    """One saved version of a rule: everything evaluation reads, as it was."""

    __tablename__ = "earning_rule_versions"
    __table_args__ = (
        Index("uq_earning_rule_versions_rule_version", "rule_id", "version", unique=True),
    )

    rule_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("earning_rules.id", ondelete="CASCADE")
    )
    version: Mapped[int] = mapped_column(Integer)
    definition: Mapped[dict[str, Any]] = mapped_column(default=dict)
    actor: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RuleAward(IdMixin, Base):
    """What a rule did for one activity (points credited, or expiry extended): what its
    caps count, and the proof that it applied once."""

    __tablename__ = "earning_rule_awards"
    __table_args__ = (
        Index("uq_earning_rule_awards_activity_rule", "activity_id", "rule_id", unique=True),
        # Per-member caps count by the activity's time; the overall cap by the rule alone.
        Index("ix_earning_rule_awards_rule_member_occurred", "rule_id", "member_id", "occurred_at"),
    )

    rule_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("earning_rules.id", ondelete="CASCADE")
    )
    rule_version: Mapped[int] = mapped_column(Integer)
    member_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("members.id", ondelete="CASCADE"))
    activity_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("activities.id", ondelete="CASCADE")
    )
    transaction_id: Mapped[int | None] = mapped_column(BigIntId)
    effect: Mapped[str] = mapped_column(String(30))
    points: Mapped[int] = mapped_column(BigInteger, default=0)
    # The activity's time: caps per day and month count the awards of its day and month.
    occurred_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
