from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class DeliveryStatus:
    # Waiting for its next attempt (or being attempted: then `next_attempt_at` is the end of
    # the claiming worker's lease).
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    # Every scheduled attempt failed, the endpoint was disabled, or the payload is too large.
    FAILED = "failed"

    ALL = (PENDING, SUCCEEDED, FAILED)


class WebhookEndpoint(IdMixin, Base):
    __tablename__ = "webhook_endpoints"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    organisation_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("organisations.id", ondelete="RESTRICT"), index=True
    )
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str] = mapped_column(String(500), default="")
    event_types: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"types": [...]}
    ordered: Mapped[bool] = mapped_column(Boolean, default=False)
    rate_limit: Mapped[int | None] = mapped_column(Integer)  # deliveries per second
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(500))
    disabled_at: Mapped[datetime | None] = mapped_column()
    # Signing secrets, encrypted at rest. During a rotation the previous one stays valid
    # (and is signed with too) until `previous_secret_expires_at`.
    secret: Mapped[str] = mapped_column(String(300))
    previous_secret: Mapped[str | None] = mapped_column(String(300))
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column()
    # Only events committed after the endpoint was created are sent to it.
    after_position: Mapped[int] = mapped_column(BigInteger, default=0)
    # Health: the first failure since the last success; cleared by a success.
    failing_since: Mapped[datetime | None] = mapped_column()
    last_success_at: Mapped[datetime | None] = mapped_column()
    last_failure_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(IdMixin, Base):
    """One event for one endpoint; its attempts are in `webhook_attempts`."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("uq_webhook_deliveries_endpoint_event", "endpoint_id", "event_id", unique=True),
        # Claiming: the due deliveries of one endpoint, and an ordered endpoint's head.
        Index("ix_webhook_deliveries_claim", "endpoint_id", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_order", "endpoint_id", "status", "event_position"),
        Index("ix_webhook_deliveries_status_created", "status", "created_at"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    endpoint_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    event_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("events.id", ondelete="CASCADE"), index=True
    )
    # The event's commit position: an ordered endpoint receives its deliveries in this order.
    event_position: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20), default=DeliveryStatus.PENDING)
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    # Scheduled attempts made so far; a manual retry sets it past the schedule so that it
    # is a single attempt.
    schedule_index: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claim_token: Mapped[str | None] = mapped_column(String(32))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()


class WebhookAttempt(IdMixin, Base):
    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "number"),)

    delivery_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column()
    duration_ms: Mapped[int] = mapped_column(Integer)
    succeeded: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[str | None] = mapped_column(Text)  # at most 2 KB
    error: Mapped[str | None] = mapped_column(String(500))
    worker: Mapped[str | None] = mapped_column(String(100))
