"""marketing: the audience sync's state, contacts, segments and journey firings

`marketing_sync_states` holds each marketing-list integration's feed position, lease and
last results; `marketing_contacts` each member's status and content hash at the list, so
unchanged members are not written again; `marketing_segments` the static segments kept at
the vendor and the addresses they were given; `marketing_journey_firings` one row per
journey rule and member, so a rule fires once per member.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06 02:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

import memberhub.kit.db

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql")
_TIME = memberhub.kit.db.UTCDateTime(timezone=True)


def _integration_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["integration_id"],
        ["integrations.id"],
        name=op.f(f"fk_{table}_integration_id_integrations"),
        ondelete="CASCADE",
    )


def _member_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["member_id"],
        ["members.id"],
        name=op.f(f"fk_{table}_member_id_members"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "marketing_sync_states",
        sa.Column("integration_id", _ID, nullable=False),
        sa.Column("event_position", sa.BigInteger(), nullable=False),
        sa.Column("list_id", sa.String(length=50), nullable=True),
        sa.Column("full_requested_at", _TIME, nullable=True),
        sa.Column("last_full_sync_at", _TIME, nullable=True),
        sa.Column("last_synced_at", _TIME, nullable=True),
        sa.Column("last_segments_at", _TIME, nullable=True),
        sa.Column("segments_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("members_written", sa.BigInteger(), nullable=False),
        sa.Column("last_run_writes", sa.Integer(), nullable=False),
        sa.Column("last_run_requests", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=1000), nullable=True),
        sa.Column("last_error_at", _TIME, nullable=True),
        sa.Column("next_attempt_at", _TIME, nullable=True),
        sa.Column("lease_until", _TIME, nullable=True),
        _integration_fk("marketing_sync_states"),
        sa.PrimaryKeyConstraint("integration_id", name=op.f("pk_marketing_sync_states")),
    )
    op.create_table(
        "marketing_contacts",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("integration_id", _ID, nullable=False),
        sa.Column("member_id", _ID, nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("synced_at", _TIME, nullable=False),
        _integration_fk("marketing_contacts"),
        _member_fk("marketing_contacts"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_marketing_contacts")),
    )
    op.create_index(
        "uq_marketing_contacts_member",
        "marketing_contacts",
        ["integration_id", "member_id"],
        unique=True,
    )
    op.create_index(
        "ix_marketing_contacts_email", "marketing_contacts", ["integration_id", "email"]
    )
    op.create_table(
        "marketing_segments",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("integration_id", _ID, nullable=False),
        sa.Column("key", sa.String(length=60), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("remote_id", sa.String(length=50), nullable=True),
        sa.Column("emails", _JSON, nullable=False),
        sa.Column("synced_at", _TIME, nullable=True),
        _integration_fk("marketing_segments"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_marketing_segments")),
    )
    op.create_index(
        "uq_marketing_segments_key", "marketing_segments", ["integration_id", "key"], unique=True
    )
    op.create_table(
        "marketing_journey_firings",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("integration_id", _ID, nullable=False),
        sa.Column("rule_key", sa.String(length=60), nullable=False),
        sa.Column("member_id", _ID, nullable=False),
        sa.Column("event_position", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("fired_at", _TIME, nullable=True),
        _integration_fk("marketing_journey_firings"),
        _member_fk("marketing_journey_firings"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_marketing_journey_firings")),
    )
    op.create_index(
        "uq_marketing_journey_firings_rule_member",
        "marketing_journey_firings",
        ["integration_id", "rule_key", "member_id"],
        unique=True,
    )
    op.create_index(
        "ix_marketing_journey_firings_status",
        "marketing_journey_firings",
        ["integration_id", "status"],
    )


def downgrade() -> None:
    op.drop_table("marketing_journey_firings")
    op.drop_table("marketing_segments")
    op.drop_table("marketing_contacts")
    op.drop_table("marketing_sync_states")
