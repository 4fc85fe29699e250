"""event sinks remember where they started: a replay never reaches before it

A replay of a time range sent the events of the range committed before the sink was
created, which the sink never subscribed to. Sinks made before this revision start after
their first logged window, or, with none logged, after the last event that occurred
before the sink was created.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-07 19:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0030"
down_revision: str | None = "0029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("event_sinks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("start_position", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.execute(
        """
        UPDATE event_sinks SET start_position = COALESCE(
            (SELECT min(d.first_position) - 1 FROM event_sink_deliveries d
             WHERE d.sink_id = event_sinks.id AND NOT d.replay),
            (SELECT max(e.position) FROM events e
             WHERE e.position IS NOT NULL AND e.occurred_at < event_sinks.created_at),
            0
        )
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("event_sinks", schema=None) as batch_op:
        batch_op.drop_column("start_position")
