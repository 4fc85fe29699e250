"""device tokens found by themselves: a token moves to the member registering it

A push token registered for another member now leaves that member, and one the vendor
says is gone is forgotten; both find it by the token alone.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-07 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0029"
down_revision: str | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_device_tokens_token", "device_tokens", ["token"], postgresql_using="hash")


def downgrade() -> None:
    op.drop_index("ix_device_tokens_token", table_name="device_tokens")
