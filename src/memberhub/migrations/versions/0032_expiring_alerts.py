"""batches remember their POINTS_EXPIRING alert, checked apart from the expiry notice

The alert was looked for only when a batch's expiring notice went out: a batch noticed
before it entered the alert window (30 days' notice, alerts for 7) never raised it.

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-07 19:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import memberhub.kit.db

revision: str = "0032"
down_revision: str | None = "0031"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("point_batches") as batch:
        batch.add_column(
            sa.Column(
                "expiring_alerted_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("point_batches") as batch:
        batch.drop_column("expiring_alerted_at")
