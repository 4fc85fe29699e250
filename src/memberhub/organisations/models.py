from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class Organisation(IdMixin, Base):
    """An HQ (no parent) or a chapter of one; scopes members and API keys."""

    __tablename__ = "organisations"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    parent_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("organisations.id", ondelete="RESTRICT"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(20))  # "hq" or "chapter"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
