"""indexes no query needs, dropped: every write paid for them

`ix_events_dispatched_at`: events are read by `dispatched_at IS NULL` only, which the partial
`ix_events_undispatched` answers; `ix_members_status`: `ix_members_status_term_ends_at`
starts with the status and answers the same queries.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-07 04:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_events_dispatched_at", table_name="events")
    op.drop_index("ix_members_status", table_name="members")


def downgrade() -> None:
    op.create_index("ix_members_status", "members", ["status"])
    op.create_index("ix_events_dispatched_at", "events", ["dispatched_at"])
