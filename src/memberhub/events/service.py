"""The transactional outbox: events are written in the caller's transaction.

An event is inserted without a feed position; the sequencer (`events/sequencer.py`) numbers
it after its transaction commits, so writers never wait on each other for the feed's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.catalog import EventData
from memberhub.events.models import Event
from memberhub.events.sequencer import mark_for_sequencing
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
    """Write an event into the outbox, inside the caller's transaction (at its next flush)."""
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
    mark_for_sequencing(session)
    return event


async def emit_many(
    session: AsyncSession,
    events: Sequence[tuple[EventData, int | None, str | None]],
    *,
    occurred_at: datetime,
) -> None:
    """Write many events (data, organisation id, member public id) in one statement, for
    jobs that change thousands of members at once. Same outbox, same order: as written."""
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
    await session.execute(table.insert(), rows)
    mark_for_sequencing(session)
