"""consent purposes crm and marketing_email, and the consent history

`members.consent_crm` starts false for every existing member: no member ever agreed to be
pushed to a CRM, so CRM pushes stop for them until consent is recorded (the README's
Consent section says how to carry it over when an organisation holds it elsewhere).
`members.consent_marketing_email` is carried from `consent_email`, the only agreement to
email a member gave so far; each member so carried gets a history row (source migration).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06 02:50:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Plain ADD COLUMN (with a constant default) on both databases: no table rebuild.
    op.add_column(
        "members",
        sa.Column("consent_crm", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column(
        "members",
        sa.Column(
            "consent_marketing_email", sa.Boolean(), nullable=False, server_default=sa.false()
        ),
    )
    op.create_table(
        "consent_changes",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("member_id", _ID, nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("client_ip", sa.String(length=64), nullable=True),
        sa.Column("occurred_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_consent_changes_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consent_changes")),
    )
    op.create_index(
        "ix_consent_changes_member_id_id", "consent_changes", ["member_id", "id"], unique=False
    )
    op.execute(
        "UPDATE members SET consent_marketing_email = consent_email "
        "WHERE deleted_at IS NULL AND consent_email"
    )
    op.execute(
        sa.text(
            "INSERT INTO consent_changes "
            "(member_id, purpose, granted, actor, source, client_ip, occurred_at) "
            "SELECT id, 'marketing_email', consent_email, 'system', 'migration', NULL, :at "
            "FROM members WHERE deleted_at IS NULL AND consent_email"
        ).bindparams(sa.bindparam("at", datetime.now(UTC), type_=_TIME))
    )


def downgrade() -> None:
    op.drop_index("ix_consent_changes_member_id_id", table_name="consent_changes")
    op.drop_table("consent_changes")
    op.drop_column("members", "consent_marketing_email")
    op.drop_column("members", "consent_crm")
