from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class Event(IdMixin, Base):
    """The transactional outbox: written in the same transaction as the change."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_type_id", "type", "id"),
        # The dispatcher's queue: committed events not yet fanned out, in commit order.
        Index(
            "ix_events_undispatched",
            "position",
            postgresql_where=text("dispatched_at IS NULL"),
            sqlite_where=text("dispatched_at IS NULL"),
        ),
        # The sequencer's queue: committed events not yet given a feed position.
        Index(
            "ix_events_unsequenced",
            "id",
            postgresql_where=text("position IS NULL"),
            sqlite_where=text("position IS NULL"),
        ),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    # Feed order: assigned after commit by the sequencer (`events/sequencer.py`), in the order
    # events became visible, so a reader paging by position never passes an event that
    # commits later (ids are assigned earlier, at insert). NULL until then.
    position: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    type: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    organisation_id: Mapped[int | None] = mapped_column(BigIntId, index=True)
    member_public_id: Mapped[str | None] = mapped_column(String(32), index=True)
    data: Mapped[dict[str, Any]] = mapped_column()
    # Set by the dispatcher once the event has been fanned out to its consumers (or by the
    # sequencer when there is none). Read only as "IS NULL", through ix_events_undispatched.
    dispatched_at: Mapped[datetime | None] = mapped_column()
