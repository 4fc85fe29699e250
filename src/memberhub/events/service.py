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

_EVENTS = cast(Table, Event.__table__)


def event_row(
    data: EventData,
    organisation_id: int | None,
    member_public_id: str | None,
    occurred_at: datetime | None,
) -> dict[str, object]:
    """The columns of a new event (for `emit`, or a write that inserts it itself and then
    calls `mark_for_sequencing`)."""
    return {
        "public_id": new_public_id("evt"),
        "type": data.event_type,
        "version": data.version,
        "occurred_at": occurred_at or utcnow(),
        "organisation_id": organisation_id,
        "member_public_id": member_public_id,
        "data": data.model_dump(mode="json"),
    }


def emit(
    session: AsyncSession,
    data: EventData,
    *,
    organisation_id: int | None = None,
    member_public_id: str | None = None,
    occurred_at: datetime | None = None,
) -> Event:
    """Write an event into the outbox, inside the caller's transaction (at its next flush)."""
    event = Event(**event_row(data, organisation_id, member_public_id, occurred_at))
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
    await session.execute(_EVENTS.insert(), rows)
    mark_for_sequencing(session)
