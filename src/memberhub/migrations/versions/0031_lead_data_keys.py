"""leads' data keys: personal data in leads' audit entries sealed, erased with the member

A lead's audit entries held its email, names and phone in the open, and the chain keeps
them for good: erasing the member the lead was enrolled as could not reach them. Leads now
carry a random key sealing those values, as members do; erasing the member deletes the
key of the leads it was enrolled from. Existing leads get one at their next change.

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-07 19:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0031"
down_revision: str | None = "0030"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("leads") as batch:
        batch.add_column(sa.Column("data_key", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("leads") as batch:
        batch.drop_column("data_key")
