"""sequencer: event positions and the audit chain are assigned after commit

Events and audit entries are written without a feed position or hash; a sequencer numbers
them and links the chain in the order they became visible. Entries written before this
revision were chained in id order, which becomes their chain position.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 01:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("chain_position", sa.BigInteger(), nullable=True))
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=True)
        batch_op.alter_column("hash", existing_type=sa.String(length=64), nullable=True)
    op.execute("UPDATE audit_log SET chain_position = id")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_audit_log_chain_position"), ["chain_position"], unique=True
        )
        batch_op.create_index(
            "ix_audit_log_unsealed",
            ["id"],
            unique=False,
            postgresql_where=sa.text("chain_position IS NULL"),
            sqlite_where=sa.text("chain_position IS NULL"),
        )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(
            "ix_events_unsequenced",
            ["id"],
            unique=False,
            postgresql_where=sa.text("position IS NULL"),
            sqlite_where=sa.text("position IS NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_unsequenced")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_unsealed")
        batch_op.drop_index(batch_op.f("ix_audit_log_chain_position"))
        batch_op.drop_column("chain_position")
