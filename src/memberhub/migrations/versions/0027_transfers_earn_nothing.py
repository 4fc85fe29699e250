"""transfers earn nothing: lifetime_earned without incoming transfers

An incoming transfer counted as earned, so moving the same points back and forth between
two members lifted both their lifetime_earned (and tiers on it) without a point earned.
Accounts are corrected by the transfers they received.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-07 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0027"
down_revision: str | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        sa.text(
            "UPDATE point_accounts SET lifetime_earned = lifetime_earned - ("
            "  SELECT COALESCE(SUM(t.points + t.pending_points), 0) FROM point_transactions t"
            "  WHERE t.member_id = point_accounts.member_id AND t.type = 'transfer_in'"
            ") WHERE EXISTS ("
            "  SELECT 1 FROM point_transactions t"
            "  WHERE t.member_id = point_accounts.member_id AND t.type = 'transfer_in'"
            ")"
        )
    )


def downgrade() -> None:
    op.execute(
        sa.text(
            "UPDATE point_accounts SET lifetime_earned = lifetime_earned + ("
            "  SELECT COALESCE(SUM(t.points + t.pending_points), 0) FROM point_transactions t"
            "  WHERE t.member_id = point_accounts.member_id AND t.type = 'transfer_in'"
            ")"
        )
    )
