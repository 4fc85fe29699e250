from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Table, func, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from memberhub.events.catalog import EventData
from memberhub.events.models import Event
from memberhub.kit.clock import utcnow
from memberhub.kit.db import lock_commit_order
from memberhub.kit.ids import new_public_id
from memberhub.kit.pending import is_savepoint_release, pending, track_savepoints

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
    pending(session.sync_session, _PENDING_KEY).append(event)
    return event


async def emit_many(
    session: AsyncSession,
    events: Sequence[tuple[EventData, int | None, str | None]],
    *,
    occurred_at: datetime,
) -> None:
    """Write many events (data, organisation id, member public id) in one statement, for
    jobs that change thousands of members at once. Same outbox, same commit-time order."""
    if not events:
        return
    table = cast(Table, Event.__table__)
    rows = [
        {
            "public_id": new_public_id("evt"),
            "type": data.event_type,
            "version": data.version,
            "occurred_at": occurred_at,
            "organisation_id": organisation_id,
            "member_public_id": member_public_id,
            "data": data.model_dump(mode="json"),
        }
        for data, organisation_id, member_public_id in events
    ]
    inserted = await session.execute(table.insert().returning(table.c.id), rows)
    pending(session.sync_session, _PENDING_KEY).extend(sorted(row.id for row in inserted))


track_savepoints(_PENDING_KEY)


@sa_event.listens_for(Session, "before_commit")
def _assign_positions(session: Session) -> None:
    if is_savepoint_release(session):
        return
    # Event objects from `emit`, row ids from `emit_many`, in the order they were written.
    held: list[Event | int] = session.info.pop(_PENDING_KEY, [])
    if not held:
        return
    lock_commit_order(session)
    last = session.execute(select(func.max(Event.position))).scalar_one_or_none() or 0
    by_id = []
    for position, item in enumerate(held, start=last + 1):
        if isinstance(item, Event):
            item.position = position
        else:
            by_id.append({"id": item, "position": position})
    session.flush()
    if by_id:
        session.execute(update(Event), by_id)
