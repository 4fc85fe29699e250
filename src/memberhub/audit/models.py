from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, IdMixin


class AuditEntry(IdMixin, Base):
    """One write, chained to the previous entry by a keyed hash (`audit/chain.py`) so edits
    can be detected."""

    __tablename__ = "audit_log"
    __table_args__ = (
        # The sequencer's queue: committed entries not yet linked into the chain.
        Index(
            "ix_audit_log_unsealed",
            "id",
            postgresql_where=text("chain_position IS NULL"),
            sqlite_where=text("chain_position IS NULL"),
        ),
    )

    occurred_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    object_type: Mapped[str] = mapped_column(String(40))
    object_id: Mapped[str] = mapped_column(String(40), index=True)
    changes: Mapped[dict[str, Any]] = mapped_column()
    request_id: Mapped[str | None] = mapped_column(String(64))
    client_ip: Mapped[str | None] = mapped_column(String(64))
    # Set by the sequencer after commit: the entry's place in the chain and its links.
    chain_position: Mapped[int | None] = mapped_column(BigInteger, index=True, unique=True)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64))
    # How `hash` was made: "<scheme>:<key id>" (`ChainKey.seal`); None for entries linked
    # before the chain was keyed, with an unkeyed SHA-256 (`legacy_entry_hash`).
    seal: Mapped[str | None] = mapped_column(String(48))
