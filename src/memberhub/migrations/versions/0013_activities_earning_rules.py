"""activities and earning rules

Activities record what members did, once per source id in their organisation's scope;
earning rules (with every version kept) credit points for them; `earning_rule_awards`
records what each rule did for each activity, once, and is what the rules' caps count.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

import memberhub.kit.db

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_UNMATCHED = sa.text("member_id IS NULL")


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql")


def _time() -> memberhub.kit.db.UTCDateTime:
    return memberhub.kit.db.UTCDateTime(timezone=True)


def _id() -> sa.Column[int]:
    return sa.Column("id", _ID, autoincrement=True, nullable=False)


def upgrade() -> None:
    op.create_table(
        "earning_rules",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.String(length=1000), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("stop_processing", sa.Boolean(), nullable=False),
        sa.Column("conditions", _json(), nullable=False),
        sa.Column("effect", _json(), nullable=False),
        sa.Column("caps", _json(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.Column("archived_at", _time(), nullable=True),
        _id(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_earning_rules")),
        sa.UniqueConstraint("public_id", name=op.f("uq_earning_rules_public_id")),
    )
    op.create_table(
        "earning_rule_versions",
        sa.Column("rule_id", _ID, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("definition", _json(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        _id(),
        sa.ForeignKeyConstraint(
            ["rule_id"],
            ["earning_rules.id"],
            name=op.f("fk_earning_rule_versions_rule_id_earning_rules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_earning_rule_versions")),
    )
    op.create_index(
        "uq_earning_rule_versions_rule_version",
        "earning_rule_versions",
        ["rule_id", "version"],
        unique=True,
    )
    op.create_table(
        "activities",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("organisation_id", _ID, nullable=True),
        sa.Column("source_scope", _ID, nullable=False),
        sa.Column("source", sa.String(length=100), nullable=False),
        sa.Column("source_id", sa.String(length=200), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("occurred_at", _time(), nullable=False),
        sa.Column("member_id", _ID, nullable=True),
        sa.Column("matched_by", sa.String(length=20), nullable=True),
        sa.Column("matched_at", _time(), nullable=True),
        sa.Column("email_normalized", sa.String(length=320), nullable=True),
        sa.Column("external_key", sa.String(length=250), nullable=True),
        sa.Column("attributes", _json(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("recorded_at", _time(), nullable=False),
        _id(),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_activities_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["organisation_id"],
            ["organisations.id"],
            name=op.f("fk_activities_organisation_id_organisations"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_activities")),
        sa.UniqueConstraint("public_id", name=op.f("uq_activities_public_id")),
    )
    op.create_index(
        "uq_activities_scope_source",
        "activities",
        ["source_scope", "source", "source_id"],
        unique=True,
    )
    op.create_index(
        "ix_activities_member_type_occurred",
        "activities",
        ["member_id", "type", "occurred_at"],
        unique=False,
    )
    op.create_index(
        "ix_activities_unmatched_email",
        "activities",
        ["email_normalized"],
        unique=False,
        sqlite_where=_UNMATCHED,
        postgresql_where=_UNMATCHED,
    )
    op.create_index(
        "ix_activities_unmatched_external_key",
        "activities",
        ["external_key"],
        unique=False,
        sqlite_where=_UNMATCHED,
        postgresql_where=_UNMATCHED,
    )
    op.create_table(
        "earning_rule_awards",
        sa.Column("rule_id", _ID, nullable=False),
        sa.Column("rule_version", sa.Integer(), nullable=False),
        sa.Column("member_id", _ID, nullable=False),
        sa.Column("activity_id", _ID, nullable=False),
        sa.Column("transaction_id", _ID, nullable=True),
        sa.Column("effect", sa.String(length=30), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("occurred_at", _time(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        _id(),
        sa.ForeignKeyConstraint(
            ["activity_id"],
            ["activities.id"],
            name=op.f("fk_earning_rule_awards_activity_id_activities"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_earning_rule_awards_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["rule_id"],
            ["earning_rules.id"],
            name=op.f("fk_earning_rule_awards_rule_id_earning_rules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_earning_rule_awards")),
    )
    op.create_index(
        "uq_earning_rule_awards_activity_rule",
        "earning_rule_awards",
        ["activity_id", "rule_id"],
        unique=True,
    )
    op.create_index(
        "ix_earning_rule_awards_rule_member_occurred",
        "earning_rule_awards",
        ["rule_id", "member_id", "occurred_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_table("earning_rule_awards")
    op.drop_table("activities")
    op.drop_table("earning_rule_versions")
    op.drop_table("earning_rules")
