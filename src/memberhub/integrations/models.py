from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class Integration(IdMixin, Base):
    """One connection to a third-party account, served by the provider of its name."""

    __tablename__ = "integrations"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    organisation_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("organisations.id", ondelete="RESTRICT"), index=True
    )
    provider: Mapped[str] = mapped_column(String(50), index=True)
    name: Mapped[str] = mapped_column(String(100))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The credentials as one encrypted JSON object (API keys, signing secrets, OAuth
    # tokens); `credential_hints` keeps the last four characters of each, for display.
    credentials: Mapped[str] = mapped_column(Text)
    credential_hints: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(500))
    # Health, kept by the payload log's writer: calls that failed for good open an incident
    # that the next success closes.
    last_success_at: Mapped[datetime | None] = mapped_column()
    last_failure_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(String(500))
    incident_opened_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class OAuthAuthorization(IdMixin, Base):
    """An authorization started with `…/oauth/authorize`, waiting for its callback."""

    __tablename__ = "oauth_authorizations"

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE"), index=True
    )
    # SHA-256 of the state sent to the provider: the state itself is a bearer secret.
    state_hash: Mapped[str] = mapped_column(String(64), unique=True)
    code_verifier: Mapped[str] = mapped_column(String(300))  # encrypted
    redirect_uri: Mapped[str] = mapped_column(String(2048))
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column()


class InboundStatus:
    PENDING = "pending"
    PROCESSED = "processed"
    # Understood but nothing to do (an event type the provider does not act on).
    IGNORED = "ignored"
    FAILED = "failed"

    ALL = (PENDING, PROCESSED, IGNORED, FAILED)


class InboundEvent(IdMixin, Base):
    """A webhook received from a provider: stored as sent, processed by the worker."""

    __tablename__ = "inbound_events"
    __table_args__ = (
        Index(
            "uq_inbound_events_integration_event",
            "integration_id",
            "provider_event_id",
            unique=True,
        ),
        Index("ix_inbound_events_status_next", "status", "next_attempt_at"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE")
    )
    provider_event_id: Mapped[str] = mapped_column(String(255))
    event_type: Mapped[str] = mapped_column(String(255))
    body: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, Any]] = mapped_column(default=dict)  # secrets masked
    source_ip: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default=InboundStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(String(1000))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column()


class IntegrationCall(IdMixin, Base):
    """The payload log: one row per outbound call, secrets masked, kept for a while."""

    __tablename__ = "integration_calls"
    __table_args__ = (
        Index("ix_integration_calls_integration_started", "integration_id", "started_at"),
        Index("ix_integration_calls_started", "started_at"),
    )

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE")
    )
    method: Mapped[str] = mapped_column(String(10))
    url: Mapped[str] = mapped_column(String(2048))
    outcome: Mapped[str] = mapped_column(String(20))
    status: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column()
    request_headers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    request_body: Mapped[str] = mapped_column(Text, default="")
    response_body: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(String(1000))


class IntegrationIncident(IdMixin, Base):
    """A stretch of time in which an integration's calls failed, until one succeeded."""

    __tablename__ = "integration_incidents"

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE"), index=True
    )
    opened_at: Mapped[datetime] = mapped_column()
    closed_at: Mapped[datetime | None] = mapped_column()
    reason: Mapped[str] = mapped_column(String(500))


class PaymentRecord(IdMixin, Base):
    """A provider's payment as applied to a member, under each id the provider knows it by
    (invoice, payment intent, charge, checkout session), so that the events about it that
    follow (a second notice of the same payment, a refund) find what it did."""

    __tablename__ = "payment_records"
    __table_args__ = (
        Index("uq_payment_records_integration_ref", "integration_id", "reference", unique=True),
    )

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE")
    )
    reference: Mapped[str] = mapped_column(String(255))
    payment_key: Mapped[str] = mapped_column(String(255), index=True)
    member_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="CASCADE"), index=True
    )
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    # The most the provider has said was refunded of the payment (its refund events carry
    # a running total): a lower total arriving later is an older event.
    refunded_amount: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    earn_transaction_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("point_transactions.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
