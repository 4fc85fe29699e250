"""console sessions signed out: a copy of the cookie no longer signs in

Signing out only made the browser forget its cookie; the signed cookie itself stayed valid
until it expired. Sessions now carry a random id, and signing out records a digest of it
until the cookie would have expired.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-07 08:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from memberhub.kit.db import UTCDateTime

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "console_sessions_ended",
        sa.Column("session_digest", sa.String(64), nullable=False),
        sa.Column("staff_id", _ID, nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["staff_id"],
            ["staff_users.id"],
            name=op.f("fk_console_sessions_ended_staff_id_staff_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_digest", name=op.f("pk_console_sessions_ended")),
    )
    op.create_index(
        op.f("ix_console_sessions_ended_staff_id"), "console_sessions_ended", ["staff_id"]
    )
    op.create_index(
        op.f("ix_console_sessions_ended_expires_at"), "console_sessions_ended", ["expires_at"]
    )


def downgrade() -> None:
    op.drop_table("console_sessions_ended")
