from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin

_UNMATCHED = text("member_id IS NULL")


class ActivityStatus:
    MATCHED = "matched"
    UNMATCHED = "unmatched"

    ALL = (MATCHED, UNMATCHED)


class MatchedBy:
    """How an activity found its member."""

    MEMBER_ID = "member_id"
    EXTERNAL_ID = "external_id"
    EMAIL = "email"
    # Named by staff on a recorded activity (`POST /activities/{id}/match`).
    MANUAL = "manual"


class Activity(IdMixin, Base):
    """Something a member did, from any source: recorded once per source id in its scope.

    Unmatched activities (`member_id` null) keep the key they were sent with
    (`email_normalized`, `external_key`) until a member with that key appears; a matched
    one no longer holds it.
    """

    __tablename__ = "activities"
    __table_args__ = (
        # A source's id applies once per scope: the activity's organisation, 0 for none.
        Index("uq_activities_scope_source", "source_scope", "source", "source_id", unique=True),
        # A member's history, and the count of its activities of a type in a period.
        Index("ix_activities_member_type_occurred", "member_id", "type", "occurred_at"),
        # Waiting activities, found again when a member with their key is created.
        Index(
            "ix_activities_unmatched_email",
            "email_normalized",
            sqlite_where=_UNMATCHED,
            postgresql_where=_UNMATCHED,
        ),
        Index(
            "ix_activities_unmatched_external_key",
            "external_key",
            sqlite_where=_UNMATCHED,
            postgresql_where=_UNMATCHED,
        ),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    organisation_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("organisations.id", ondelete="SET NULL")
    )
    # The organisation's id when recorded (0 for none), kept if the organisation goes.
    source_scope: Mapped[int] = mapped_column(BigIntId)
    source: Mapped[str] = mapped_column(String(100))
    source_id: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(100))
    occurred_at: Mapped[datetime] = mapped_column()
    member_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="CASCADE")
    )
    matched_by: Mapped[str | None] = mapped_column(String(20))
    matched_at: Mapped[datetime | None] = mapped_column()
    email_normalized: Mapped[str | None] = mapped_column(String(320))
    # `SYSTEM:ID`, as a member's `external_ids` would map SYSTEM to ID.
    external_key: Mapped[str | None] = mapped_column(String(250))
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The lead it made (or found) while unmatched, where the program says so
    # (`unmatched_activity_leads`); kept after it matches.
    lead_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("leads.id", ondelete="SET NULL"), index=True
    )
    actor: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)
