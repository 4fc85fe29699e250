from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin, JSONType


class AccountingMapping(Base):
    """Where an accounting integration books memberships' money, as validated against the
    organisation's chart of accounts when it was saved."""

    __tablename__ = "finance_mappings"

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE"), primary_key=True
    )
    mapping: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tenant_id: Mapped[str] = mapped_column(String(64))
    tenant_name: Mapped[str | None] = mapped_column(String(255))
    validated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(64))


class EntryKind:
    SALE = "sale"  # a paid membership: contact, invoice, payment
    UNPAID = "unpaid"  # a failed payment: contact and invoice, left unpaid
    REFUND = "refund"  # a refund: credit note and the refund of it
    PAYOUT = "payout"  # a payout: a transfer from the clearing account to the bank

    ALL = (SALE, UNPAID, REFUND, PAYOUT)


class EntryStatus:
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"

    ALL = (PENDING, DONE, FAILED)


class FinanceEntry(IdMixin, Base):
    """One payment provider's object (a payment, a failed invoice, a refund) to book in one
    accounting integration: written in the transaction that applied the payment, worked by
    the worker step by step, each vendor id kept as soon as it is known.

    `source_ref` is the payment's key at the provider (its first id); a failed invoice
    later paid is the same entry, moved on from unpaid to sale.
    """

    __tablename__ = "finance_entries"
    __table_args__ = (
        Index("uq_finance_entries_source", "integration_id", "kind", "source_ref", unique=True),
        Index("ix_finance_entries_due", "status", "next_attempt_at"),
        Index("ix_finance_entries_integration", "integration_id", "id"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE")
    )
    source_integration_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="SET NULL")
    )
    kind: Mapped[str] = mapped_column(String(10))
    source_ref: Mapped[str] = mapped_column(String(255))
    # The entry a refund refunds (its invoice is what the credit note is against).
    refunds_entry_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("finance_entries.id", ondelete="SET NULL")
    )
    member_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="SET NULL"), index=True
    )
    plan_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("membership_plans.id", ondelete="SET NULL")
    )
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    occurred_at: Mapped[datetime] = mapped_column()
    status: Mapped[str] = mapped_column(String(10), default=EntryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(String(1000))
    contact_id: Mapped[str | None] = mapped_column(String(64))
    invoice_id: Mapped[str | None] = mapped_column(String(64))
    payment_id: Mapped[str | None] = mapped_column(String(64))
    credit_note_id: Mapped[str | None] = mapped_column(String(64))
    refund_id: Mapped[str | None] = mapped_column(String(64))
    transfer_id: Mapped[str | None] = mapped_column(String(64))
    fees_id: Mapped[str | None] = mapped_column(String(64))  # the fees' spend money
    # What happened, step by step: [{"at", "step", "outcome", "message"?, "id"?}].
    log: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()


class ReconciliationStatus:
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class Reconciliation(IdMixin, Base):
    """A comparison, for one period, of the payment provider's money, the accounting
    system's invoices and payments, and memberhub's membership terms."""

    __tablename__ = "finance_reconciliations"
    __table_args__ = (Index("ix_finance_reconciliations_status", "status"),)

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE"), index=True
    )
    source_integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE")
    )
    period_start: Mapped[datetime] = mapped_column()
    period_end: Mapped[datetime] = mapped_column()
    status: Mapped[str] = mapped_column(String(10), default=ReconciliationStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(String(1000))
    # {"summary": {...}, "mismatches": [{"id", "kind", ..., "fix"}]}
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    requested_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    completed_at: Mapped[datetime | None] = mapped_column()
