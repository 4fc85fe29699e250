"""claim and approval reference scope: a client's reference is unique per organisation

Reward claims and approval requests record whose reference they carry (`reference_scope`:
the member's organisation, 0 for members without one), as ledger transactions do since
0009, and their installation-wide unique constraint on `reference_id` becomes a unique index
on (reference_scope, reference_id). References written before this revision take the scope
of their member's organisation now.

The downgrade restores the installation-wide constraints: it fails while two organisations
hold the same reference.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 18:30:00
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WITH_REFERENCE = sa.text("reference_id IS NOT NULL")
_TABLES = ("reward_claims", "approval_requests")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column(
                    "reference_scope",
                    sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                    nullable=True,
                )
            )
        op.execute(
            f"UPDATE {table} SET reference_scope = ("
            " SELECT COALESCE(members.organisation_id, 0) FROM members"
            f" WHERE members.id = {table}.member_id)"
            " WHERE reference_id IS NOT NULL"
        )
        # On SQLite dropping the constraint recreates the table, reflecting the tables its
        # foreign keys name; members has an expression index reflection skips (it is not
        # recreated, so nothing is lost).
        with (
            warnings.catch_warnings(action="ignore", category=sa.exc.SAWarning),
            op.batch_alter_table(table, schema=None) as batch_op,
        ):
            batch_op.drop_constraint(f"uq_{table}_reference_id", type_="unique")
            batch_op.create_index(
                f"uq_{table}_scope_reference",
                ["reference_scope", "reference_id"],
                unique=True,
                sqlite_where=_WITH_REFERENCE,
                postgresql_where=_WITH_REFERENCE,
            )


def downgrade() -> None:
    for table in _TABLES:
        with (
            warnings.catch_warnings(action="ignore", category=sa.exc.SAWarning),
            op.batch_alter_table(table, schema=None) as batch_op,
        ):
            batch_op.drop_index(
                f"uq_{table}_scope_reference",
                sqlite_where=_WITH_REFERENCE,
                postgresql_where=_WITH_REFERENCE,
            )
            batch_op.create_unique_constraint(f"uq_{table}_reference_id", ["reference_id"])
            batch_op.drop_column("reference_scope")
