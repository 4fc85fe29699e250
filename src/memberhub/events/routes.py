from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from memberhub.auth.dependencies import EventsReader
from memberhub.events.catalog import CATALOG, schema_for
from memberhub.events.models import Event
from memberhub.events.repository import EventFilters, EventRepository
from memberhub.events.schemas import EventOut, EventTypeList, EventTypeOut
from memberhub.events.sequencer import catch_up
from memberhub.kit.errors import NotFound, ValidationFailed
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath, UTCDatetime

router = APIRouter(
    prefix="/api/v1", tags=["events"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)


def to_out(event: Event) -> EventOut:
    return EventOut(
        id=event.public_id,
        type=event.type,
        version=event.version,
        occurred_at=event.occurred_at,
        member_id=event.member_public_id,
        data=event.data,
    )


@router.get("/events")
async def list_events(
    request: Request,
    session: DbSession,
    principal: EventsReader,
    page: Annotated[PageParams, Depends(page_params)],
    type: Annotated[
        list[str] | None,
        Query(description="One or more event types; repeat the parameter for several."),
    ] = None,
    member_id: Annotated[str | None, Query(pattern=r"^mem_[0-9a-z]{1,40}$")] = None,
    occurred_from: UTCDatetime | None = None,
    occurred_to: UTCDatetime | None = None,
) -> Page[EventOut]:
    """Events in the order their changes committed (numbered just after commit).
    `next_cursor` is set whenever the page has events, also on the last page: poll with it
    to receive only newer events."""
    types = tuple(type or ())
    unknown = sorted(set(types) - set(CATALOG))
    if unknown:
        raise ValidationFailed(
            "Unknown event types.",
            details={"unknown_types": unknown[:20], "known_types": sorted(CATALOG)},
        )
    # The feed lists sequenced events; sequence what has committed so far before reading.
    await catch_up(request.app.state.db, session)
    filters = EventFilters(
        types=types,
        member_public_id=member_id,
        organisation_ids=principal.visible_organisation_ids,
        occurred_from=occurred_from,
        occurred_to=occurred_to,
    )
    rows = await EventRepository(session).list(
        filters, after_position=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit, key="position", feed=True)
    return Page(data=[to_out(e) for e in items], pagination=pagination)


@router.get("/events/{event_id}")
async def get_event(event_id: IdPath, session: DbSession, principal: EventsReader) -> EventOut:
    """One event, as the webhooks carry it."""
    event = await EventRepository(session).get_by_public_id(event_id)
    if event is None or not principal.can_see_organisation(event.organisation_id):
        raise NotFound(f"Event {event_id} does not exist.")
    return to_out(event)


@router.get("/event-types")
async def list_event_types(_principal: EventsReader) -> EventTypeList:
    """Every event type with its description and the schema of its data."""
    return EventTypeList(
        data=[
            EventTypeOut(
                type=name,
                version=model.version,
                description=model.description,
                data_schema=schema_for(model),
            )
            for name, model in sorted(CATALOG.items())
        ]
    )
