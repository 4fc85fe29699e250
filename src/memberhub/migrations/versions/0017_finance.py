"""finance: accounting mappings, finance entries and reconciliations

`finance_mappings` keeps, per accounting integration (Xero), the accounts, tax types and
tracking its bookings use, validated against the organisation's chart when saved.
`finance_entries` holds one row per payment provider object to book (a payment, a failed
invoice, a refund), written in the transaction that applied the payment and worked by the
worker. `finance_reconciliations` holds the reports comparing Stripe, Xero and memberhub
for a period.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05 23:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

import memberhub.kit.db

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "finance_mappings",
        sa.Column(
            "integration_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "mapping",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_name", sa.String(length=255), nullable=True),
        sa.Column("validated_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["integration_id"],
            ["integrations.id"],
            name=op.f("fk_finance_mappings_integration_id_integrations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("integration_id", name=op.f("pk_finance_mappings")),
    )
    op.create_table(
        "finance_reconciliations",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column(
            "integration_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "source_integration_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.Column("period_start", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("period_end", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=1000), nullable=True),
        sa.Column(
            "report",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("requested_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("completed_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["integration_id"],
            ["integrations.id"],
            name=op.f("fk_finance_reconciliations_integration_id_integrations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["source_integration_id"],
            ["integrations.id"],
            name=op.f("fk_finance_reconciliations_source_integration_id_integrations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_finance_reconciliations")),
        sa.UniqueConstraint("public_id", name=op.f("uq_finance_reconciliations_public_id")),
    )
    with op.batch_alter_table("finance_reconciliations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_finance_reconciliations_integration_id"),
            ["integration_id"],
            unique=False,
        )
        batch_op.create_index("ix_finance_reconciliations_status", ["status"], unique=False)

    op.create_table(
        "finance_entries",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column(
            "integration_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "source_integration_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
        ),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("source_ref", sa.String(length=255), nullable=False),
        sa.Column(
            "refunds_entry_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("plan_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("occurred_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=1000), nullable=True),
        sa.Column("contact_id", sa.String(length=64), nullable=True),
        sa.Column("invoice_id", sa.String(length=64), nullable=True),
        sa.Column("payment_id", sa.String(length=64), nullable=True),
        sa.Column("credit_note_id", sa.String(length=64), nullable=True),
        sa.Column("refund_id", sa.String(length=64), nullable=True),
        sa.Column("transfer_id", sa.String(length=64), nullable=True),
        sa.Column("fees_id", sa.String(length=64), nullable=True),
        sa.Column(
            "log",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("completed_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["integration_id"],
            ["integrations.id"],
            name=op.f("fk_finance_entries_integration_id_integrations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_finance_entries_member_id_members"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["plan_id"],
            ["membership_plans.id"],
            name=op.f("fk_finance_entries_plan_id_membership_plans"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["refunds_entry_id"],
            ["finance_entries.id"],
            name=op.f("fk_finance_entries_refunds_entry_id_finance_entries"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["source_integration_id"],
            ["integrations.id"],
            name=op.f("fk_finance_entries_source_integration_id_integrations"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_finance_entries")),
        sa.UniqueConstraint("public_id", name=op.f("uq_finance_entries_public_id")),
    )
    with op.batch_alter_table("finance_entries", schema=None) as batch_op:
        batch_op.create_index("ix_finance_entries_due", ["status", "next_attempt_at"], unique=False)
        batch_op.create_index(
            "ix_finance_entries_integration", ["integration_id", "id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_finance_entries_member_id"), ["member_id"], unique=False
        )
        batch_op.create_index(
            "uq_finance_entries_source", ["integration_id", "kind", "source_ref"], unique=True
        )


def downgrade() -> None:
    with op.batch_alter_table("finance_entries", schema=None) as batch_op:
        batch_op.drop_index("uq_finance_entries_source")
        batch_op.drop_index(batch_op.f("ix_finance_entries_member_id"))
        batch_op.drop_index("ix_finance_entries_integration")
        batch_op.drop_index("ix_finance_entries_due")

    op.drop_table("finance_entries")
    with op.batch_alter_table("finance_reconciliations", schema=None) as batch_op:
        batch_op.drop_index("ix_finance_reconciliations_status")
        batch_op.drop_index(batch_op.f("ix_finance_reconciliations_integration_id"))

    op.drop_table("finance_reconciliations")
    op.drop_table("finance_mappings")
