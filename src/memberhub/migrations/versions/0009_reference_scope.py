"""reference scope: a ledger reference_id is unique per organisation, not installation-wide

Each transaction with a reference records whose it is (`reference_scope`: the member's
organisation, 0 for members without one), and the unique index on (type, reference_id)
becomes one on (reference_scope, type, reference_id). References written before this
revision take the scope of their member's organisation now.

The downgrade restores the installation-wide index: it fails while two organisations hold
the same reference for the same type of operation.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WITH_REFERENCE = sa.text("reference_id IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("point_transactions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "reference_scope",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
            )
        )
    op.execute(
        "UPDATE point_transactions SET reference_scope = ("
        " SELECT COALESCE(members.organisation_id, 0) FROM members"
        " WHERE members.id = point_transactions.member_id)"
        " WHERE reference_id IS NOT NULL"
    )
    with op.batch_alter_table("point_transactions", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_point_transactions_type_reference",
            sqlite_where=_WITH_REFERENCE,
            postgresql_where=_WITH_REFERENCE,
        )
        batch_op.create_index(
            "uq_point_transactions_scope_type_reference",
            ["reference_scope", "type", "reference_id"],
            unique=True,
            sqlite_where=_WITH_REFERENCE,
            postgresql_where=_WITH_REFERENCE,
        )


def downgrade() -> None:
    with op.batch_alter_table("point_transactions", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_point_transactions_scope_type_reference",
            sqlite_where=_WITH_REFERENCE,
            postgresql_where=_WITH_REFERENCE,
        )
        batch_op.create_index(
            "uq_point_transactions_type_reference",
            ["type", "reference_id"],
            unique=True,
            sqlite_where=_WITH_REFERENCE,
            postgresql_where=_WITH_REFERENCE,
        )
    with op.batch_alter_table("point_transactions", schema=None) as batch_op:
        batch_op.drop_column("reference_scope")
