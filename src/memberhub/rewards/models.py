from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class ClaimStatus:
    CLAIMED = "claimed"
    CANCELLED = "cancelled"


class Reward(IdMixin, Base):
    __tablename__ = "rewards"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    code: Mapped[str] = mapped_column(String(50), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(String(1000))
    points_cost: Mapped[int] = mapped_column(BigInteger)
    # None: unlimited. Decremented by claims, given back by cancellations.
    stock: Mapped[int | None] = mapped_column(Integer)
    per_member_limit: Mapped[int | None] = mapped_column(Integer)
    tier_codes: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"codes": [...]}
    valid_from: Mapped[datetime | None] = mapped_column()
    valid_until: Mapped[datetime | None] = mapped_column()
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class RewardClaim(IdMixin, Base):
    __tablename__ = "reward_claims"
    __table_args__ = (
        Index("ix_reward_claims_reward_member", "reward_id", "member_id", "status"),
        # A client's reference applies once per organisation (see `reference_scope`).
        Index(
            "uq_reward_claims_scope_reference",
            "reference_scope",
            "reference_id",
            unique=True,
            sqlite_where=text("reference_id IS NOT NULL"),
            postgresql_where=text("reference_id IS NOT NULL"),
        ),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    reward_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("rewards.id", ondelete="RESTRICT"))
    member_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(20), default=ClaimStatus.CLAIMED)
    points: Mapped[int] = mapped_column(BigInteger)
    reference_id: Mapped[str | None] = mapped_column(String(200))
    # The member's organisation (0 for none) when the claim carries a reference.
    reference_scope: Mapped[int | None] = mapped_column(BigIntId)
    transaction_id: Mapped[int] = mapped_column(BigIntId)
    refund_transaction_id: Mapped[int | None] = mapped_column(BigIntId)
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)
    cancelled_at: Mapped[datetime | None] = mapped_column()
    cancel_reason: Mapped[str | None] = mapped_column(String(1000))
