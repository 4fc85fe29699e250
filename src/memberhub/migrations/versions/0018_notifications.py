"""notifications: templates, preferences, devices, suppressions and the notification log

`notifications` is the notification outbox and its log: one row per event, recipient and
channel (unique), made by the planner from the committed event feed, whose position it
keeps in `notification_feed_state`. `renewal_notices` remembers which renewal reminders
were announced.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

import memberhub.kit.db

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_QUEUED = sa.text("status = 'queued'")


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql")


def _time() -> memberhub.kit.db.UTCDateTime:
    return memberhub.kit.db.UTCDateTime(timezone=True)


def _id() -> sa.Column[int]:
    return sa.Column("id", _ID, autoincrement=True, nullable=False)


def _member_fk(table: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["member_id"], ["members.id"], name=op.f(f"fk_{table}_member_id_members"), ondelete=ondelete
    )


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("event_public_id", sa.String(length=32), nullable=False),
        sa.Column("message_type", sa.String(length=60), nullable=False),
        sa.Column("category", sa.String(length=20), nullable=False),
        sa.Column("channel", sa.String(length=10), nullable=False),
        sa.Column("audience", sa.String(length=10), nullable=False),
        sa.Column("member_id", _ID, nullable=True),
        sa.Column("organisation_id", _ID, nullable=True),
        sa.Column("recipient", sa.String(length=4096), nullable=True),
        sa.Column("recipient_key", sa.String(length=200), nullable=False),
        sa.Column("locale", sa.String(length=35), nullable=True),
        sa.Column("subject", sa.String(length=998), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("html", sa.Text(), nullable=True),
        sa.Column("headers", _json(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.String(length=100), nullable=True),
        sa.Column("error", sa.String(length=2000), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _time(), nullable=True),
        sa.Column("claim", sa.String(length=32), nullable=True),
        sa.Column("integration_id", _ID, nullable=True),
        sa.Column("provider_message_id", sa.String(length=300), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("sent_at", _time(), nullable=True),
        sa.Column("delivered_at", _time(), nullable=True),
        sa.Column("updated_at", _time(), nullable=False),
        _id(),
        _member_fk("notifications", "SET NULL"),
        sa.ForeignKeyConstraint(
            ["integration_id"],
            ["integrations.id"],
            name=op.f("fk_notifications_integration_id_integrations"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
        sa.UniqueConstraint("public_id", name=op.f("uq_notifications_public_id")),
        sa.UniqueConstraint(
            "event_public_id",
            "recipient_key",
            "channel",
            name=op.f("uq_notifications_event_public_id_recipient_key_channel"),
        ),
    )
    op.create_index(
        "ix_notifications_due",
        "notifications",
        ["next_attempt_at"],
        postgresql_where=_QUEUED,
        sqlite_where=_QUEUED,
    )
    op.create_index(
        "ix_notifications_member_type",
        "notifications",
        ["member_id", "message_type", "created_at"],
    )
    op.create_index(
        "ix_notifications_provider_message_id", "notifications", ["provider_message_id"]
    )
    op.create_index(op.f("ix_notifications_message_type"), "notifications", ["message_type"])
    op.create_index(op.f("ix_notifications_organisation_id"), "notifications", ["organisation_id"])
    op.create_index(op.f("ix_notifications_status"), "notifications", ["status"])

    op.create_table(
        "notification_templates",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("message_type", sa.String(length=60), nullable=False),
        sa.Column("channel", sa.String(length=10), nullable=False),
        sa.Column("locale", sa.String(length=35), nullable=False),
        sa.Column("subject", sa.String(length=998), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=10), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        _id(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_templates")),
        sa.UniqueConstraint("public_id", name=op.f("uq_notification_templates_public_id")),
        sa.UniqueConstraint(
            "message_type",
            "channel",
            "locale",
            name=op.f("uq_notification_templates_message_type_channel_locale"),
        ),
    )

    op.create_table(
        "notification_preferences",
        sa.Column("member_id", _ID, nullable=False),
        sa.Column("push", sa.Boolean(), nullable=False),
        sa.Column("marketing_email", sa.Boolean(), nullable=False),
        sa.Column("marketing_sms", sa.Boolean(), nullable=False),
        sa.Column("marketing_push", sa.Boolean(), nullable=False),
        sa.Column("locale", sa.String(length=35), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=True),
        sa.Column("updated_at", _time(), nullable=False),
        _member_fk("notification_preferences", "CASCADE"),
        sa.PrimaryKeyConstraint("member_id", name=op.f("pk_notification_preferences")),
    )

    op.create_table(
        "device_tokens",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("member_id", _ID, nullable=False),
        sa.Column("token", sa.String(length=4096), nullable=False),
        sa.Column("platform", sa.String(length=20), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        _id(),
        _member_fk("device_tokens", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_tokens")),
        sa.UniqueConstraint("public_id", name=op.f("uq_device_tokens_public_id")),
        sa.UniqueConstraint("member_id", "token", name=op.f("uq_device_tokens_member_id_token")),
    )
    op.create_index(op.f("ix_device_tokens_member_id"), "device_tokens", ["member_id"])

    op.create_table(
        "notification_suppressions",
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("channel", sa.String(length=10), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("source", sa.String(length=100), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        _id(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_suppressions")),
        sa.UniqueConstraint("public_id", name=op.f("uq_notification_suppressions_public_id")),
        sa.UniqueConstraint(
            "channel", "address", name=op.f("uq_notification_suppressions_channel_address")
        ),
    )

    op.create_table(
        "notification_settings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("settings", _json(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_settings")),
    )

    op.create_table(
        "notification_feed_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_feed_state")),
    )
    # An installation upgrading starts notifying from now: its past events told no one.
    op.execute(
        "INSERT INTO notification_feed_state (id, event_position)"
        " SELECT 1, COALESCE(MAX(position), 0) FROM events"
    )

    op.create_table(
        "renewal_notices",
        sa.Column("member_id", _ID, nullable=False),
        sa.Column("term_ends_at", _time(), nullable=False),
        sa.Column("days_before", sa.Integer(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        _id(),
        _member_fk("renewal_notices", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_renewal_notices")),
        sa.UniqueConstraint(
            "member_id",
            "term_ends_at",
            "days_before",
            name=op.f("uq_renewal_notices_member_id_term_ends_at_days_before"),
        ),
    )
    op.create_index(op.f("ix_renewal_notices_member_id"), "renewal_notices", ["member_id"])


def downgrade() -> None:
    op.drop_table("renewal_notices")
    op.drop_table("notification_feed_state")
    op.drop_table("notification_settings")
    op.drop_table("notification_suppressions")
    op.drop_table("device_tokens")
    op.drop_table("notification_preferences")
    op.drop_table("notification_templates")
    op.drop_table("notifications")
