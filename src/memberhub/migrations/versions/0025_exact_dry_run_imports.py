"""member import dry runs exact across chunks: each row's member keys kept

A dry run applies each chunk and rolls it back, so a row meeting a member that an earlier
chunk created or changed found nothing. Its rows now keep the member they name (normalised
email, external id), and a later chunk replays the earlier rows naming the same members
inside its own rolled-back trial first.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-07 06:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("bulk_job_rows") as batch:
        batch.add_column(sa.Column("match_email", sa.String(320), nullable=True))
        batch.add_column(sa.Column("match_external", sa.String(300), nullable=True))
    for column in ("match_email", "match_external"):
        where = sa.text(f"{column} IS NOT NULL")
        op.create_index(
            f"ix_bulk_job_rows_{column}",
            "bulk_job_rows",
            ["job_id", column],
            sqlite_where=where,
            postgresql_where=where,
        )


def downgrade() -> None:
    op.drop_index("ix_bulk_job_rows_match_external", table_name="bulk_job_rows")
    op.drop_index("ix_bulk_job_rows_match_email", table_name="bulk_job_rows")
    with op.batch_alter_table("bulk_job_rows") as batch:
        batch.drop_column("match_external")
        batch.drop_column("match_email")
