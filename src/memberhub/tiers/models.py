from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, IdMixin


class TierBasis:
    LIFETIME_EARNED = "lifetime_earned"
    ROLLING_EARNED = "rolling_earned"
    CURRENT_BALANCE = "current_balance"

    ALL = (LIFETIME_EARNED, ROLLING_EARNED, CURRENT_BALANCE)


class DowngradePolicy:
    NEVER = "never"
    ONE_STEP = "one_step"
    TO_QUALIFYING = "to_qualifying"

    ALL = (NEVER, ONE_STEP, TO_QUALIFYING)


class Tier(IdMixin, Base):
    __tablename__ = "tiers"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    code: Mapped[str] = mapped_column(String(50), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    rank: Mapped[int] = mapped_column(Integer, unique=True)
    threshold: Mapped[int] = mapped_column(Integer)
    basis: Mapped[str] = mapped_column(String(30), default=TierBasis.LIFETIME_EARNED)
    window_days: Mapped[int | None] = mapped_column(Integer)
    downgrade_policy: Mapped[str] = mapped_column(String(30), default=DowngradePolicy.NEVER)
    earn_multiplier_percent: Mapped[int] = mapped_column(Integer, default=100)
    benefits: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"items": [...]}
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
