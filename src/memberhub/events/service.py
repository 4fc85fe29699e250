from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.catalog import EventData
from memberhub.events.models import Event
from memberhub.kit.clock import utcnow
from memberhub.kit.ids import new_public_id


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
    return event
