"""members' data keys: personal data in audit entries sealed, erased with the member

The audit chain cannot change an entry once linked, so the personal values a member's
audit entries held outlived its erasure. Members now carry a random key sealing those
values; erasure deletes it. Existing members get one at their next change.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-07 09:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0028"
down_revision: str | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("members") as batch:
        batch.add_column(sa.Column("data_key", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("members") as batch:
        batch.drop_column("data_key")
