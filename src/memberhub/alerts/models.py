from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class AlertType:
    POINTS_EXPIRING = "POINTS_EXPIRING"
    LARGE_REDEMPTION = "LARGE_REDEMPTION"
    NEGATIVE_BALANCE = "NEGATIVE_BALANCE"
    HIGH_EXPIRATION_RATE = "HIGH_EXPIRATION_RATE"
    LOW_REDEMPTION_RATE = "LOW_REDEMPTION_RATE"
    WEBHOOK_ENDPOINT_DISABLED = "WEBHOOK_ENDPOINT_DISABLED"
    PAYMENT_FAILED = "PAYMENT_FAILED"
    INTEGRATION_INCIDENT = "INTEGRATION_INCIDENT"

    ALL = (
        POINTS_EXPIRING,
        LARGE_REDEMPTION,
        NEGATIVE_BALANCE,
        HIGH_EXPIRATION_RATE,
        LOW_REDEMPTION_RATE,
        WEBHOOK_ENDPOINT_DISABLED,
        PAYMENT_FAILED,
        INTEGRATION_INCIDENT,
    )


class AlertStatus:
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"


class Alert(IdMixin, Base):
    __tablename__ = "alerts"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    type: Mapped[str] = mapped_column(String(40), index=True)
    priority: Mapped[str] = mapped_column(String(10))  # low / medium / high
    status: Mapped[str] = mapped_column(String(20), default=AlertStatus.OPEN, index=True)
    member_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="CASCADE"), index=True
    )
    message: Mapped[str] = mapped_column(String(1000))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # One alert per condition: a second raise of the same key is a no-op.
    dedupe_key: Mapped[str] = mapped_column(String(200), unique=True)
    points: Mapped[int | None] = mapped_column(BigInteger)
    raised_at: Mapped[datetime] = mapped_column(default=utcnow)
    acknowledged_at: Mapped[datetime | None] = mapped_column()
    acknowledged_by: Mapped[str | None] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(String(1000))
