from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class ApiKey(IdMixin, Base):
    """An API key; only its lookup prefix and SHA-256 digest are stored."""

    __tablename__ = "api_keys"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(20))
    scopes: Mapped[dict[str, Any]] = mapped_column()  # {"scopes": [...]} or {"scopes": null}
    organisation_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("organisations.id", ondelete="RESTRICT"), index=True
    )
    rate_limit: Mapped[str | None] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
