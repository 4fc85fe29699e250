from __future__ import annotations

from datetime import datetime

from sqlalchemy import event as sa_event
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from memberhub.events.catalog import EventData
from memberhub.events.models import Event
from memberhub.kit.clock import utcnow
from memberhub.kit.db import lock_commit_order
from memberhub.kit.ids import new_public_id

_PENDING_KEY = "memberhub.pending_events"


def emit(
    session: AsyncSession,
    data: EventData,
    *,
    organisation_id: int | None = None,
    member_public_id: str | None = None,
    occurred_at: datetime | None = None,
) -> Event:
    """Write an event into the outbox, inside the caller's transaction."""
    event = Event(
        public_id=new_public_id("evt"),
        type=data.event_type,
        version=data.version,
        occurred_at=occurred_at or utcnow(),
        organisation_id=organisation_id,
        member_public_id=member_public_id,
        data=data.model_dump(mode="json"),
    )
    session.add(event)
    session.info.setdefault(_PENDING_KEY, []).append(event)
    return event


@sa_event.listens_for(Session, "before_commit")
def _assign_positions(session: Session) -> None:
    pending: list[Event] = session.info.pop(_PENDING_KEY, [])
    if not pending:
        return
    lock_commit_order(session)
    last = session.execute(select(func.max(Event.position))).scalar_one_or_none() or 0
    for offset, event in enumerate(pending, start=1):
        event.position = last + offset
    session.flush()


@sa_event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING_KEY, None)
