"""activity leads: an unmatched activity may make a lead

The program's `unmatched_activity_leads` setting (off until enabled) makes an activity that
matches no member and carries an email create a lead, or find the one waiting with that
email; `activities.lead_id` names that lead.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 21:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql")


def upgrade() -> None:
    op.add_column(
        "loyalty_program",
        sa.Column("unmatched_activity_leads", _JSON, nullable=False, server_default="{}"),
    )
    if op.get_bind().dialect.name == "sqlite":
        # SQLite adds a column with a REFERENCES clause (its default null) in place; alembic
        # would recreate the table to add the constraint on its own.
        op.execute(
            "ALTER TABLE activities ADD COLUMN lead_id INTEGER"
            " CONSTRAINT fk_activities_lead_id_leads REFERENCES leads (id) ON DELETE SET NULL"
        )
    else:
        op.add_column("activities", sa.Column("lead_id", _ID, nullable=True))
        op.create_foreign_key(
            op.f("fk_activities_lead_id_leads"),
            "activities",
            "leads",
            ["lead_id"],
            ["id"],
            ondelete="SET NULL",
        )
    op.create_index(op.f("ix_activities_lead_id"), "activities", ["lead_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_activities_lead_id"), table_name="activities")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("activities", schema=None) as batch_op:
            batch_op.drop_column("lead_id")
    else:
        op.drop_constraint(op.f("fk_activities_lead_id_leads"), "activities", type_="foreignkey")
        op.drop_column("activities", "lead_id")
    op.drop_column("loyalty_program", "unmatched_activity_leads")
