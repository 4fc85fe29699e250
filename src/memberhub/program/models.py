from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base


class ExpiryPolicy:
    NEVER = "never"
    DAYS_AFTER_EARN = "days_after_earn"
    END_OF_MONTH_AFTER_DAYS = "end_of_month_after_days"
    FIXED_DATE = "fixed_date"

    ALL = (NEVER, DAYS_AFTER_EARN, END_OF_MONTH_AFTER_DAYS, FIXED_DATE)


class NegativeBalancePolicy:
    FORBID = "forbid"
    ALLOW_FOR_REVERSALS = "allow_for_reversals"

    ALL = (FORBID, ALLOW_FOR_REVERSALS)


class LoyaltyProgram(Base):
    """The installation's loyalty program settings: one row, id 1, created on first read."""

    __tablename__ = "loyalty_program"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), default="MYR")
    # `earn_points` points for every `earn_per_amount` minor units spent (1 point per 200 sen).
    earn_points: Mapped[int] = mapped_column(Integer, default=1)
    earn_per_amount: Mapped[int] = mapped_column(BigInteger, default=200)
    expiry_policy: Mapped[str] = mapped_column(String(30), default=ExpiryPolicy.NEVER)
    expiry_days: Mapped[int | None] = mapped_column(Integer)
    expiry_fixed_month: Mapped[int | None] = mapped_column(Integer)
    expiry_fixed_day: Mapped[int | None] = mapped_column(Integer)
    pending_days: Mapped[int] = mapped_column(Integer, default=0)
    negative_balance_policy: Mapped[str] = mapped_column(
        String(30), default=NegativeBalancePolicy.FORBID
    )
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    expiring_notice_days: Mapped[int] = mapped_column(Integer, default=30)
    # What points are worth: `point_value_amount` minor units per `point_value_points` points.
    point_value_amount: Mapped[int] = mapped_column(BigInteger, default=1)
    point_value_points: Mapped[int] = mapped_column(Integer, default=1)
    # Staff limits per role and alert thresholds; see program.schemas for their shape.
    role_limits: Mapped[dict[str, Any]] = mapped_column(default=dict)
    alert_thresholds: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Whether an unmatched activity with an email makes a lead; see program.schemas.
    unmatched_activity_leads: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
