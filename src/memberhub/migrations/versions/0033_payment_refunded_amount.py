"""payments remember the most Stripe has said was refunded of them

A refund event carries the charge's running total refunded; one delivered after a later,
larger one (events arrive in any order) turned a fully refunded payment back into a
partially refunded one.

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-07 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0033"
down_revision: str | None = "0032"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("payment_records") as batch:
        batch.add_column(
            sa.Column("refunded_amount", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("payment_records") as batch:
        batch.drop_column("refunded_amount")
