from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class StaffUser(IdMixin, Base):
    """A person who signs in to the console. Holds a role and an optional organisation as an
    API key does, and acts with exactly a key's permissions for them. Only an argon2 hash of
    the password is kept; the TOTP secret is kept encrypted with the master secret."""

    __tablename__ = "staff_users"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)  # stored lower-cased
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    organisation_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("organisations.id", ondelete="RESTRICT"), index=True
    )
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    password_hash: Mapped[str | None] = mapped_column(String(200))
    failed_sign_ins: Mapped[int] = mapped_column(default=0)
    locked_until: Mapped[datetime | None] = mapped_column()
    totp_secret: Mapped[str | None] = mapped_column(Text)  # encrypted; set once confirmed
    totp_pending_secret: Mapped[str | None] = mapped_column(Text)  # encrypted; while enrolling
    # The time step of the last code accepted: a code is accepted once.
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)
    # Raised when the password, the second factor or the account's access changes: sessions
    # signed in under an older value end.
    session_version: Mapped[int] = mapped_column(default=1)
    last_sign_in_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class EndedConsoleSession(Base):
    """A console session signed out before it expired: its cookie, though still signed and
    within its lifetime, no longer signs anyone in. Kept by a digest of the session's id
    until the cookie would have expired anyway."""

    __tablename__ = "console_sessions_ended"

    session_digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    staff_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("staff_users.id", ondelete="CASCADE"), index=True
    )
    expires_at: Mapped[datetime] = mapped_column(index=True)
