"""audit seal: the audit chain is keyed (HMAC-SHA256 under a key derived from SECRET_KEY)

Each linked entry names how its hash was made (`seal`: scheme and key id). Entries linked
before this revision keep their unkeyed SHA-256 hash and no seal. `memberhub db upgrade`,
when it applies this revision, then checks those entries the old way and, if the whole chain
is intact, re-seals it with the key in one transaction (printing the old and the new head);
if the chain does not check, nothing is re-sealed and `memberhub audit verify` goes on naming
the entries. `memberhub audit reseal` does the same by hand (after `alembic upgrade`, say).
The schema change itself needs no secret: an empty log, or one migrated without `memberhub`,
is upgraded all the same.

The downgrade drops the column; keyed hashes do not verify with the previous version's
`audit verify`.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 04:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seal", sa.String(length=48), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_column("seal")
