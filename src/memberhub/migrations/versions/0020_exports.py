"""exports: tables written to storage integrations, by run and part

`exports` says what to export where (and on which cron schedule) and keeps the incremental
watermark; `export_runs` each run's key range, progress and lease; `export_parts` the files
each recorded part wrote, from which a resumed run continues.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-06 00:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql")
_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "exports",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("table_name", sa.String(length=40), nullable=False),
        sa.Column("format", sa.String(length=10), nullable=False),
        sa.Column("mode", sa.String(length=20), nullable=False),
        sa.Column("storage_integration_id", _ID, nullable=False),
        sa.Column("schedule", sa.String(length=120), nullable=True),
        sa.Column("next_run_at", _TIME, nullable=True),
        sa.Column("watermark", sa.BigInteger(), nullable=True),
        sa.Column("runs_started", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["storage_integration_id"],
            ["integrations.id"],
            name=op.f("fk_exports_storage_integration_id_integrations"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exports")),
        sa.UniqueConstraint("public_id", name=op.f("uq_exports_public_id")),
    )
    op.create_index(
        "uq_exports_storage_table", "exports", ["storage_integration_id", "table_name"], unique=True
    )
    op.create_index(op.f("ix_exports_next_run_at"), "exports", ["next_run_at"])
    op.create_table(
        "export_runs",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("export_id", _ID, nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(length=20), nullable=False),
        sa.Column("mode", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("watermark_from", sa.BigInteger(), nullable=True),
        sa.Column("watermark_to", sa.BigInteger(), nullable=True),
        sa.Column("cursor", sa.BigInteger(), nullable=True),
        sa.Column("total_rows", sa.BigInteger(), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("parts", sa.Integer(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("manifest_key", sa.String(length=1024), nullable=True),
        sa.Column("error", sa.String(length=1000), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("started_at", _TIME, nullable=True),
        sa.Column("finished_at", _TIME, nullable=True),
        sa.Column("lease_expires_at", _TIME, nullable=True),
        sa.ForeignKeyConstraint(
            ["export_id"],
            ["exports.id"],
            name=op.f("fk_export_runs_export_id_exports"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_runs")),
        sa.UniqueConstraint("public_id", name=op.f("uq_export_runs_public_id")),
    )
    op.create_index(
        "ix_export_runs_export_sequence", "export_runs", ["export_id", "sequence"], unique=True
    )
    op.create_index("ix_export_runs_status_id", "export_runs", ["status", "id"])
    op.create_table(
        "export_parts",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("run_id", _ID, nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("first_key", sa.BigInteger(), nullable=False),
        sa.Column("last_key", sa.BigInteger(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("files", _JSON, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["export_runs.id"],
            name=op.f("fk_export_parts_run_id_export_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_parts")),
    )
    op.create_index("ix_export_parts_run_number", "export_parts", ["run_id", "number"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_export_parts_run_number", table_name="export_parts")
    op.drop_table("export_parts")
    op.drop_index("ix_export_runs_status_id", table_name="export_runs")
    op.drop_index("ix_export_runs_export_sequence", table_name="export_runs")
    op.drop_table("export_runs")
    op.drop_index(op.f("ix_exports_next_run_at"), table_name="exports")
    op.drop_index("uq_exports_storage_table", table_name="exports")
    op.drop_table("exports")
