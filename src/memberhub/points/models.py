from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class BatchStatus:
    PENDING = "pending"
    ACTIVE = "active"
    SPENT = "spent"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    ALL = (PENDING, ACTIVE, SPENT, EXPIRED, CANCELLED)


class BatchSource:
    EARN = "earn"
    AWARD = "award"
    RECOVER = "recover"
    TRANSFER = "transfer"
    REFUND = "refund"
    # Points owed after a reversal took more than the balance held: a batch with negative
    # remaining, settled by the next points that become active.
    DEFICIT = "deficit"


class TxnType:
    EARN = "earn"
    AWARD = "award"
    ACTIVATE = "activate"
    REDEEM = "redeem"
    REDEEM_REFUND = "redeem_refund"
    DEDUCT = "deduct"
    REVERSE = "reverse"
    EXPIRE = "expire"
    EXTEND = "extend"
    RECOVER = "recover"
    TRANSFER_OUT = "transfer_out"
    TRANSFER_IN = "transfer_in"

    ALL = (
        EARN,
        AWARD,
        ACTIVATE,
        REDEEM,
        REDEEM_REFUND,
        DEDUCT,
        REVERSE,
        EXPIRE,
        EXTEND,
        RECOVER,
        TRANSFER_OUT,
        TRANSFER_IN,
    )


class PointAccount(Base):
    """A member's points aggregates, kept with the ledger in the same transaction.

    Every ledger write locks this row first, which serialises writes per member.
    """

    __tablename__ = "point_accounts"

    member_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="CASCADE"), primary_key=True
    )
    current: Mapped[int] = mapped_column(BigInteger, default=0)
    pending: Mapped[int] = mapped_column(BigInteger, default=0)
    lifetime_earned: Mapped[int] = mapped_column(BigInteger, default=0)
    lifetime_redeemed: Mapped[int] = mapped_column(BigInteger, default=0)
    lifetime_expired: Mapped[int] = mapped_column(BigInteger, default=0)
    # Tier state: the code shown on the member, and a manual floor until a date.
    tier_code: Mapped[str | None] = mapped_column(String(50))
    tier_floor_code: Mapped[str | None] = mapped_column(String(50))
    tier_floor_until: Mapped[datetime | None] = mapped_column()
    tier_reviewed_at: Mapped[datetime | None] = mapped_column(index=True)
    last_activity_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PointTransaction(IdMixin, Base):
    """The append-only ledger. `points` changes the current balance, `pending_points` the
    pending one; their running sums are the account's current and pending."""

    __tablename__ = "point_transactions"
    __table_args__ = (
        # A reference applies once per organisation (see `reference_scope`).
        Index(
            "uq_point_transactions_scope_type_reference",
            "reference_scope",
            "type",
            "reference_id",
            unique=True,
            sqlite_where=text("reference_id IS NOT NULL"),
            postgresql_where=text("reference_id IS NOT NULL"),
        ),
        Index("ix_point_transactions_member_occurred", "member_id", "occurred_at", "id"),
        Index("ix_point_transactions_type_occurred", "type", "occurred_at"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    member_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("members.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(20))
    points: Mapped[int] = mapped_column(BigInteger, default=0)
    pending_points: Mapped[int] = mapped_column(BigInteger, default=0)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    pending_after: Mapped[int] = mapped_column(BigInteger, default=0)
    reason: Mapped[str | None] = mapped_column(String(1000))
    reference_id: Mapped[str | None] = mapped_column(String(200))
    # Whose reference it is: the member's organisation when it was written, 0 for members
    # without one (as with their emails); set exactly when `reference_id` is. Another
    # organisation may use the same reference for its own operation.
    reference_scope: Mapped[int | None] = mapped_column(BigIntId)
    # The earn a reversal undoes, the expiry a recovery restores, and so on.
    related_transaction_id: Mapped[int | None] = mapped_column(BigIntId, index=True)
    batch_id: Mapped[int | None] = mapped_column(BigIntId)
    amount: Mapped[int | None] = mapped_column(BigInteger)  # purchase amount, minor units
    currency: Mapped[str | None] = mapped_column(String(3))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    actor: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)


class PointBatch(IdMixin, Base):
    """Points earned together, with their own expiry and what is left of them."""

    __tablename__ = "point_batches"
    __table_args__ = (
        Index("ix_point_batches_member_status", "member_id", "status"),
        Index("ix_point_batches_status_expires_at", "status", "expires_at"),
        # The expiry and activation jobs walk members in id order within a status.
        Index("ix_point_batches_status_member", "status", "member_id", "expires_at"),
        Index("ix_point_batches_status_activates_at", "status", "activates_at"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    member_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("members.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(String(20))
    initial: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)
    expired_points: Mapped[int] = mapped_column(BigInteger, default=0)
    recovered_points: Mapped[int] = mapped_column(BigInteger, default=0)
    # The expire transaction that took what remained (it summarises all its batches).
    expired_transaction_id: Mapped[int | None] = mapped_column(BigIntId)
    # Reversals: `cancelled_points` came out of `remaining`; the rest of `reversed_points`
    # was taken back from the balance because it had been spent.
    reversed_points: Mapped[int] = mapped_column(BigInteger, default=0)
    cancelled_points: Mapped[int] = mapped_column(BigInteger, default=0)
    transaction_id: Mapped[int] = mapped_column(BigIntId, index=True)
    activates_at: Mapped[datetime | None] = mapped_column()
    expires_at: Mapped[datetime | None] = mapped_column()
    expiring_notified_at: Mapped[datetime | None] = mapped_column()
    # When its POINTS_EXPIRING alert was raised (checked apart from the notice).
    expiring_alerted_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PointAllocation(IdMixin, Base):
    """How many points a transaction took from (or settled into) one batch."""

    __tablename__ = "point_allocations"

    transaction_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("point_transactions.id", ondelete="CASCADE"), index=True
    )
    batch_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("point_batches.id", ondelete="CASCADE"), index=True
    )
    points: Mapped[int] = mapped_column(BigInteger)
