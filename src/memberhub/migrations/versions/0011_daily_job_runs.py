"""daily job runs: daily jobs run at a time of day in the program's time zone, once a day
whatever the number of workers

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 15:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import memberhub.kit.db

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "daily_job_runs",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("last_run_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_daily_job_runs")),
    )


def downgrade() -> None:
    op.drop_table("daily_job_runs")
