"""event sinks: analytics integrations subscribed to the event feed, and their delivery log

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql")
_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "event_sinks",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("integration_id", _ID, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("event_types", _JSON, nullable=False),
        sa.Column("mapping", _JSON, nullable=False),
        sa.Column("request_deletion", sa.Boolean(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("event_position", sa.BigInteger(), nullable=False),
        sa.Column("window_sent", _JSON, nullable=False),
        sa.Column("replay_from", sa.BigInteger(), nullable=True),
        sa.Column("replay_to", sa.BigInteger(), nullable=True),
        sa.Column("replay_requested_at", _TIME, nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _TIME, nullable=True),
        sa.Column("lease_until", _TIME, nullable=True),
        sa.Column("last_error", sa.String(length=1000), nullable=True),
        sa.Column("last_error_at", _TIME, nullable=True),
        sa.Column("failing_since", _TIME, nullable=True),
        sa.Column("last_success_at", _TIME, nullable=True),
        sa.Column("events_sent", sa.BigInteger(), nullable=False),
        sa.Column("events_skipped", sa.BigInteger(), nullable=False),
        sa.Column("events_refused", sa.BigInteger(), nullable=False),
        sa.Column("requests_sent", sa.BigInteger(), nullable=False),
        sa.Column("deletions_requested", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["integration_id"],
            ["integrations.id"],
            name=op.f("fk_event_sinks_integration_id_integrations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_sinks")),
        sa.UniqueConstraint("public_id", name=op.f("uq_event_sinks_public_id")),
    )
    op.create_index(op.f("ix_event_sinks_integration_id"), "event_sinks", ["integration_id"])
    op.create_table(
        "event_sink_deliveries",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("sink_id", _ID, nullable=False),
        sa.Column("replay", sa.Boolean(), nullable=False),
        sa.Column("first_position", sa.BigInteger(), nullable=False),
        sa.Column("last_position", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("events_sent", sa.Integer(), nullable=False),
        sa.Column("events_skipped", sa.Integer(), nullable=False),
        sa.Column("events_refused", sa.Integer(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("deletions", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=1000), nullable=True),
        sa.Column("started_at", _TIME, nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sink_id"],
            ["event_sinks.id"],
            name=op.f("fk_event_sink_deliveries_sink_id_event_sinks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_sink_deliveries")),
    )
    op.create_index(
        "ix_event_sink_deliveries_sink_id_id", "event_sink_deliveries", ["sink_id", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_event_sink_deliveries_sink_id_id", table_name="event_sink_deliveries")
    op.drop_table("event_sink_deliveries")
    op.drop_index(op.f("ix_event_sinks_integration_id"), table_name="event_sinks")
    op.drop_table("event_sinks")
