"""search index: where each search-index integration's sync stands in the event feed

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 23:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import memberhub.kit.db

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "search_sync_states",
        sa.Column(
            "integration_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.Column("event_position", sa.BigInteger(), nullable=False),
        sa.Column("settings_fingerprint", sa.String(length=64), nullable=True),
        sa.Column(
            "reindex_requested_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("last_reindex_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_synced_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("records_saved", sa.BigInteger(), nullable=False),
        sa.Column("records_deleted", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=1000), nullable=True),
        sa.Column("last_error_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("lease_until", memberhub.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["integration_id"],
            ["integrations.id"],
            name=op.f("fk_search_sync_states_integration_id_integrations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("integration_id", name=op.f("pk_search_sync_states")),
    )


def downgrade() -> None:
    op.drop_table("search_sync_states")
