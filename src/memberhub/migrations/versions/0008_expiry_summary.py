"""expiry summary: a batch names the expire transaction that took it, instead of an
allocation row per expired batch

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 02:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("point_batches", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "expired_transaction_id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
            )
        )
    # Batches expired before: their expire transaction is the one their allocation names.
    op.execute(
        "UPDATE point_batches SET expired_transaction_id = ("
        " SELECT point_allocations.transaction_id FROM point_allocations"
        " JOIN point_transactions ON point_transactions.id = point_allocations.transaction_id"
        " WHERE point_allocations.batch_id = point_batches.id"
        " AND point_transactions.type = 'expire'"
        " ORDER BY point_allocations.id DESC LIMIT 1)"
        " WHERE expired_points > 0"
    )


def downgrade() -> None:
    with op.batch_alter_table("point_batches", schema=None) as batch_op:
        batch_op.drop_column("expired_transaction_id")
