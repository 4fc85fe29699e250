"""a marketing audience compares every member again where two held one address

Members of different organisations may share an address, which a marketing list (keyed by
address) holds once. The sync now writes one owner per address; an integration whose
contacts still hold one address for two members (as the sync wrote them before) is asked
for a full comparison, which writes the owner and drops the other contacts.

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-08 01:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0034"
down_revision: str | None = "0033"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        UPDATE marketing_sync_states SET full_requested_at = CURRENT_TIMESTAMP
        WHERE full_requested_at IS NULL AND integration_id IN (
            SELECT integration_id FROM marketing_contacts
            WHERE status = 'subscribed'
            GROUP BY integration_id, email
            HAVING COUNT(*) > 1
        )
        """
    )


def downgrade() -> None:
    """Nothing to undo: a full comparison asked for changes no schema."""
