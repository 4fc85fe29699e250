from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin

if TYPE_CHECKING:
    from memberhub.members.models import Member
    from memberhub.organisations.models import Organisation


class LeadStatus:
    NEW = "new"
    CONTACTED = "contacted"
    QUALIFIED = "qualified"
    ENROLLED = "enrolled"
    LOST = "lost"

    ALL = (NEW, CONTACTED, QUALIFIED, ENROLLED, LOST)


# Where a lead may move by an update; `enrolled` is reached only by enrolling.
TRANSITIONS: dict[str, frozenset[str]] = {
    LeadStatus.NEW: frozenset({LeadStatus.CONTACTED, LeadStatus.QUALIFIED, LeadStatus.LOST}),
    LeadStatus.CONTACTED: frozenset({LeadStatus.QUALIFIED, LeadStatus.LOST}),
    LeadStatus.QUALIFIED: frozenset({LeadStatus.CONTACTED, LeadStatus.LOST}),
    LeadStatus.LOST: frozenset({LeadStatus.NEW}),  # reopened
    LeadStatus.ENROLLED: frozenset(),
}


class Lead(IdMixin, Base):
    __tablename__ = "leads"
    __table_args__ = (
        Index("ix_leads_organisation_email", "organisation_id", "email_normalized"),
        Index("ix_leads_status_created", "status", "created_at"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    organisation_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("organisations.id", ondelete="RESTRICT")
    )
    email: Mapped[str | None] = mapped_column(String(320))
    email_normalized: Mapped[str | None] = mapped_column(String(320))
    first_name: Mapped[str | None] = mapped_column(String(200))
    last_name: Mapped[str | None] = mapped_column(String(200))
    phone: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default=LeadStatus.NEW)
    source: Mapped[str | None] = mapped_column(String(100))
    agent_id: Mapped[str | None] = mapped_column(String(100))
    custom_fields: Mapped[dict[str, Any]] = mapped_column(default=dict)
    external_ids: Mapped[dict[str, Any]] = mapped_column(default=dict)
    lost_reason: Mapped[str | None] = mapped_column(String(1000))
    member_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("members.id", ondelete="SET NULL")
    )
    version: Mapped[int] = mapped_column(Integer, default=1)
    # Seals the lead's personal values in its audit entries (`members/personal.py`);
    # deleted when the member it was enrolled as is erased.
    data_key: Mapped[str | None] = mapped_column(String(64))
    status_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    organisation: Mapped[Organisation | None] = relationship(lazy="raise")
    member: Mapped[Member | None] = relationship(lazy="raise")

    __mapper_args__ = {"version_id_col": version}
