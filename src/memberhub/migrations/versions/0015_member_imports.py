"""member imports: bulk jobs that create and update members

A member import is a bulk job (`operation` = `member_import`) whose rows are members: it
keeps its options (how rows match members, the default organisation and plan, the column
mapping) and whether it is a dry run; each row's outcome says what was done to the member
(`created`, `updated` or `unchanged`).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 23:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql")


def upgrade() -> None:
    op.add_column("bulk_jobs", sa.Column("options", _JSON, nullable=True))
    op.add_column(
        "bulk_jobs", sa.Column("dry_run", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.add_column("bulk_job_rows", sa.Column("action", sa.String(20), nullable=True))
    op.create_index(op.f("ix_bulk_jobs_operation"), "bulk_jobs", ["operation", "id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_bulk_jobs_operation"), table_name="bulk_jobs")
    with op.batch_alter_table("bulk_job_rows") as batch_op:
        batch_op.drop_column("action")
    with op.batch_alter_table("bulk_jobs") as batch_op:
        batch_op.drop_column("dry_run")
        batch_op.drop_column("options")
