"""loyalty engine

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 13:02:05.244295
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

import memberhub.kit.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "loyalty_program",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("earn_points", sa.Integer(), nullable=False),
        sa.Column("earn_per_amount", sa.BigInteger(), nullable=False),
        sa.Column("expiry_policy", sa.String(length=30), nullable=False),
        sa.Column("expiry_days", sa.Integer(), nullable=True),
        sa.Column("expiry_fixed_month", sa.Integer(), nullable=True),
        sa.Column("expiry_fixed_day", sa.Integer(), nullable=True),
        sa.Column("pending_days", sa.Integer(), nullable=False),
        sa.Column("negative_balance_policy", sa.String(length=30), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("expiring_notice_days", sa.Integer(), nullable=False),
        sa.Column("point_value_amount", sa.BigInteger(), nullable=False),
        sa.Column("point_value_points", sa.Integer(), nullable=False),
        sa.Column(
            "role_limits",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "alert_thresholds",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("updated_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_loyalty_program")),
    )
    op.create_table(
        "rewards",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("code", sa.String(length=50), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.String(length=1000), nullable=True),
        sa.Column("points_cost", sa.BigInteger(), nullable=False),
        sa.Column("stock", sa.Integer(), nullable=True),
        sa.Column("per_member_limit", sa.Integer(), nullable=True),
        sa.Column(
            "tier_codes",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("valid_from", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("valid_until", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rewards")),
        sa.UniqueConstraint("code", name=op.f("uq_rewards_code")),
        sa.UniqueConstraint("public_id", name=op.f("uq_rewards_public_id")),
    )
    op.create_table(
        "tiers",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("code", sa.String(length=50), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("basis", sa.String(length=30), nullable=False),
        sa.Column("window_days", sa.Integer(), nullable=True),
        sa.Column("downgrade_policy", sa.String(length=30), nullable=False),
        sa.Column("earn_multiplier_percent", sa.Integer(), nullable=False),
        sa.Column(
            "benefits",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tiers")),
        sa.UniqueConstraint("code", name=op.f("uq_tiers_code")),
        sa.UniqueConstraint("public_id", name=op.f("uq_tiers_public_id")),
        sa.UniqueConstraint("rank", name=op.f("uq_tiers_rank")),
    )
    op.create_table(
        "bulk_jobs",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("operation", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("total_rows", sa.Integer(), nullable=False),
        sa.Column("processed_rows", sa.Integer(), nullable=False),
        sa.Column("applied_rows", sa.Integer(), nullable=False),
        sa.Column("duplicate_rows", sa.Integer(), nullable=False),
        sa.Column("failed_rows", sa.Integer(), nullable=False),
        sa.Column("default_reason", sa.String(length=1000), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column(
            "organisation_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("error", sa.String(length=1000), nullable=True),
        sa.Column("created_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("lease_expires_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["organisation_id"],
            ["organisations.id"],
            name=op.f("fk_bulk_jobs_organisation_id_organisations"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bulk_jobs")),
        sa.UniqueConstraint("public_id", name=op.f("uq_bulk_jobs_public_id")),
    )
    with op.batch_alter_table("bulk_jobs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_bulk_jobs_organisation_id"), ["organisation_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_bulk_jobs_status"), ["status"], unique=False)

    op.create_table(
        "bulk_job_chunks",
        sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("first_row", sa.Integer(), nullable=False),
        sa.Column("row_count", sa.Integer(), nullable=False),
        sa.Column("rows", sa.Text(), nullable=False),
        sa.Column("processed_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["bulk_jobs.id"],
            name=op.f("fk_bulk_job_chunks_job_id_bulk_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bulk_job_chunks")),
    )
    with op.batch_alter_table("bulk_job_chunks", schema=None) as batch_op:
        batch_op.create_index("ix_bulk_job_chunks_job_seq", ["job_id", "sequence"], unique=True)

    op.create_table(
        "bulk_job_rows",
        sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("row_number", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("member_id", sa.String(length=320), nullable=True),
        sa.Column("points", sa.BigInteger(), nullable=True),
        sa.Column("reference_id", sa.String(length=200), nullable=True),
        sa.Column("transaction_id", sa.String(length=32), nullable=True),
        sa.Column("error", sa.String(length=1000), nullable=True),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["bulk_jobs.id"],
            name=op.f("fk_bulk_job_rows_job_id_bulk_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bulk_job_rows")),
    )
    with op.batch_alter_table("bulk_job_rows", schema=None) as batch_op:
        batch_op.create_index("ix_bulk_job_rows_job_row", ["job_id", "row_number"], unique=True)

    op.create_table(
        "alerts",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("priority", sa.String(length=10), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("message", sa.String(length=1000), nullable=False),
        sa.Column(
            "data",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("dedupe_key", sa.String(length=200), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=True),
        sa.Column("raised_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("acknowledged_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_by", sa.String(length=64), nullable=True),
        sa.Column("note", sa.String(length=1000), nullable=True),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_alerts_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_alerts_dedupe_key")),
        sa.UniqueConstraint("public_id", name=op.f("uq_alerts_public_id")),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alerts_member_id"), ["member_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_alerts_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_alerts_type"), ["type"], unique=False)

    op.create_table(
        "approval_requests",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("operation", sa.String(length=20), nullable=False),
        sa.Column(
            "member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("reference_id", sa.String(length=200), nullable=True),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("requested_by", sa.String(length=64), nullable=False),
        sa.Column("requested_role", sa.String(length=20), nullable=False),
        sa.Column("decided_by", sa.String(length=64), nullable=True),
        sa.Column("decision_note", sa.String(length=1000), nullable=True),
        sa.Column(
            "transaction_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("created_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("decided_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_approval_requests_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approval_requests")),
        sa.UniqueConstraint("public_id", name=op.f("uq_approval_requests_public_id")),
        sa.UniqueConstraint("reference_id", name=op.f("uq_approval_requests_reference_id")),
    )
    with op.batch_alter_table("approval_requests", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_approval_requests_member_id"), ["member_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_approval_requests_status"), ["status"], unique=False)

    op.create_table(
        "point_accounts",
        sa.Column(
            "member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("current", sa.BigInteger(), nullable=False),
        sa.Column("pending", sa.BigInteger(), nullable=False),
        sa.Column("lifetime_earned", sa.BigInteger(), nullable=False),
        sa.Column("lifetime_redeemed", sa.BigInteger(), nullable=False),
        sa.Column("lifetime_expired", sa.BigInteger(), nullable=False),
        sa.Column("tier_code", sa.String(length=50), nullable=True),
        sa.Column("tier_floor_code", sa.String(length=50), nullable=True),
        sa.Column("tier_floor_until", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("tier_reviewed_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_activity_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_point_accounts_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("member_id", name=op.f("pk_point_accounts")),
    )
    with op.batch_alter_table("point_accounts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_point_accounts_tier_reviewed_at"), ["tier_reviewed_at"], unique=False
        )

    op.create_table(
        "point_batches",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column(
            "member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("initial", sa.BigInteger(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.Column("expired_points", sa.BigInteger(), nullable=False),
        sa.Column("recovered_points", sa.BigInteger(), nullable=False),
        sa.Column("reversed_points", sa.BigInteger(), nullable=False),
        sa.Column("cancelled_points", sa.BigInteger(), nullable=False),
        sa.Column(
            "transaction_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("activates_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("expires_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "expiring_notified_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("created_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_point_batches_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_point_batches")),
        sa.UniqueConstraint("public_id", name=op.f("uq_point_batches_public_id")),
    )
    with op.batch_alter_table("point_batches", schema=None) as batch_op:
        batch_op.create_index(
            "ix_point_batches_member_status", ["member_id", "status"], unique=False
        )
        batch_op.create_index(
            "ix_point_batches_status_activates_at", ["status", "activates_at"], unique=False
        )
        batch_op.create_index(
            "ix_point_batches_status_expires_at", ["status", "expires_at"], unique=False
        )
        batch_op.create_index(
            "ix_point_batches_status_member", ["status", "member_id", "expires_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_point_batches_transaction_id"), ["transaction_id"], unique=False
        )

    op.create_table(
        "point_transactions",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column(
            "member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("type", sa.String(length=20), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("pending_points", sa.BigInteger(), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("pending_after", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=True),
        sa.Column("reference_id", sa.String(length=200), nullable=True),
        sa.Column(
            "related_transaction_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
        ),
        sa.Column("batch_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column(
            "details",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("occurred_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_point_transactions_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_point_transactions")),
        sa.UniqueConstraint("public_id", name=op.f("uq_point_transactions_public_id")),
    )
    with op.batch_alter_table("point_transactions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_point_transactions_member_occurred",
            ["member_id", "occurred_at", "id"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_point_transactions_related_transaction_id"),
            ["related_transaction_id"],
            unique=False,
        )
        batch_op.create_index(
            "ix_point_transactions_type_occurred", ["type", "occurred_at"], unique=False
        )
        batch_op.create_index(
            "uq_point_transactions_type_reference",
            ["type", "reference_id"],
            unique=True,
            sqlite_where=sa.text("reference_id IS NOT NULL"),
            postgresql_where=sa.text("reference_id IS NOT NULL"),
        )

    op.create_table(
        "reward_claims",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column(
            "reward_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("reference_id", sa.String(length=200), nullable=True),
        sa.Column(
            "transaction_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "refund_transaction_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
        ),
        sa.Column("claimed_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("cancel_reason", sa.String(length=1000), nullable=True),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_reward_claims_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reward_id"],
            ["rewards.id"],
            name=op.f("fk_reward_claims_reward_id_rewards"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reward_claims")),
        sa.UniqueConstraint("public_id", name=op.f("uq_reward_claims_public_id")),
        sa.UniqueConstraint("reference_id", name=op.f("uq_reward_claims_reference_id")),
    )
    with op.batch_alter_table("reward_claims", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reward_claims_member_id"), ["member_id"], unique=False)
        batch_op.create_index(
            "ix_reward_claims_reward_member", ["reward_id", "member_id", "status"], unique=False
        )

    op.create_table(
        "point_allocations",
        sa.Column(
            "transaction_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("batch_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["point_batches.id"],
            name=op.f("fk_point_allocations_batch_id_point_batches"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["point_transactions.id"],
            name=op.f("fk_point_allocations_transaction_id_point_transactions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_point_allocations")),
    )
    with op.batch_alter_table("point_allocations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_point_allocations_batch_id"), ["batch_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_point_allocations_transaction_id"), ["transaction_id"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("point_allocations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_point_allocations_transaction_id"))
        batch_op.drop_index(batch_op.f("ix_point_allocations_batch_id"))

    op.drop_table("point_allocations")
    with op.batch_alter_table("reward_claims", schema=None) as batch_op:
        batch_op.drop_index("ix_reward_claims_reward_member")
        batch_op.drop_index(batch_op.f("ix_reward_claims_member_id"))

    op.drop_table("reward_claims")
    with op.batch_alter_table("point_transactions", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_point_transactions_type_reference",
            sqlite_where=sa.text("reference_id IS NOT NULL"),
            postgresql_where=sa.text("reference_id IS NOT NULL"),
        )
        batch_op.drop_index("ix_point_transactions_type_occurred")
        batch_op.drop_index(batch_op.f("ix_point_transactions_related_transaction_id"))
        batch_op.drop_index("ix_point_transactions_member_occurred")

    op.drop_table("point_transactions")
    with op.batch_alter_table("point_batches", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_point_batches_transaction_id"))
        batch_op.drop_index("ix_point_batches_status_member")
        batch_op.drop_index("ix_point_batches_status_expires_at")
        batch_op.drop_index("ix_point_batches_status_activates_at")
        batch_op.drop_index("ix_point_batches_member_status")

    op.drop_table("point_batches")
    with op.batch_alter_table("point_accounts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_point_accounts_tier_reviewed_at"))

    op.drop_table("point_accounts")
    with op.batch_alter_table("approval_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_approval_requests_status"))
        batch_op.drop_index(batch_op.f("ix_approval_requests_member_id"))

    op.drop_table("approval_requests")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alerts_type"))
        batch_op.drop_index(batch_op.f("ix_alerts_status"))
        batch_op.drop_index(batch_op.f("ix_alerts_member_id"))

    op.drop_table("alerts")
    with op.batch_alter_table("bulk_job_rows", schema=None) as batch_op:
        batch_op.drop_index("ix_bulk_job_rows_job_row")

    op.drop_table("bulk_job_rows")
    with op.batch_alter_table("bulk_job_chunks", schema=None) as batch_op:
        batch_op.drop_index("ix_bulk_job_chunks_job_seq")

    op.drop_table("bulk_job_chunks")
    with op.batch_alter_table("bulk_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bulk_jobs_status"))
        batch_op.drop_index(batch_op.f("ix_bulk_jobs_organisation_id"))

    op.drop_table("bulk_jobs")
    op.drop_table("tiers")
    op.drop_table("rewards")
    op.drop_table("loyalty_program")
