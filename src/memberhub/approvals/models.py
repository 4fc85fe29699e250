from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class ApprovalStatus:
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"

    ALL = (PENDING, APPROVED, REJECTED)


class ApprovalRequest(IdMixin, Base):
    """A points operation held for a manager's decision (a deduction above the caller's limit
    or sent with `require_approval`)."""

    __tablename__ = "approval_requests"
    __table_args__ = (
        # A client's reference applies once per organisation (see `reference_scope`).
        Index(
            "uq_approval_requests_scope_reference",
            "reference_scope",
            "reference_id",
            unique=True,
            sqlite_where=text("reference_id IS NOT NULL"),
            postgresql_where=text("reference_id IS NOT NULL"),
        ),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    operation: Mapped[str] = mapped_column(String(20))  # "deduct"
    member_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="CASCADE"), index=True
    )
    points: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(1000))
    reference_id: Mapped[str | None] = mapped_column(String(200))
    # The member's organisation (0 for none) when the request carries a reference.
    reference_scope: Mapped[int | None] = mapped_column(BigIntId)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default=ApprovalStatus.PENDING, index=True)
    requested_by: Mapped[str] = mapped_column(String(64))
    requested_role: Mapped[str] = mapped_column(String(20))
    decided_by: Mapped[str | None] = mapped_column(String(64))
    decision_note: Mapped[str | None] = mapped_column(String(1000))
    transaction_id: Mapped[int | None] = mapped_column(BigIntId)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column()
