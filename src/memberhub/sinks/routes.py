from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status

from memberhub.auth.dependencies import IntegrationsReader, IntegrationsWriter
from memberhub.events.sequencer import catch_up
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.routes import OutboundRoute
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath
from memberhub.sinks import service
from memberhub.sinks.schemas import (
    DeliveryOut,
    DryRunOut,
    DryRunRequest,
    ReplayRequest,
    SinkCreate,
    SinkOut,
    SinkPatch,
)

router = APIRouter(
    prefix="/api/v1/event-sinks",
    tags=["event sinks"],
    route_class=UnitOfWorkRoute,
    responses=ERROR_RESPONSES,
)
# Reads only, and may ask the vendor's validation endpoint: no write lock held meanwhile.
outbound = APIRouter(
    prefix="/api/v1/event-sinks",
    tags=["event sinks"],
    route_class=OutboundRoute,
    responses=ERROR_RESPONSES,
)


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_sink(
    payload: SinkCreate, session: DbSession, principal: IntegrationsWriter, response: Response
) -> SinkOut:
    """Subscribe an analytics integration (Segment, GA4) to the event feed: the events of
    `event_types` committed from now on are sent, mapped to the vendor's names, for members
    who consent to the integration's purpose (`analytics`)."""
    sink = await service.create_sink(session, principal, payload)
    response.headers["Location"] = f"/api/v1/event-sinks/{sink.id}"
    return sink


@router.get("")
async def list_sinks(
    session: DbSession,
    principal: IntegrationsReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[SinkOut]:
    """The event sinks the key may see, oldest first."""
    rows, latest = await service.list_sinks(
        session, principal, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page([sink for sink, _ in rows], page.limit)
    integrations = {sink.id: integration for sink, integration in rows}
    return Page(
        data=[service.to_out(sink, integrations[sink.id], latest) for sink in items],
        pagination=pagination,
    )


@router.get("/{sink_id}")
async def get_sink(sink_id: IdPath, session: DbSession, principal: IntegrationsReader) -> SinkOut:
    """The sink, with its position in the feed, lag, health and totals."""
    return await service.show_sink(session, principal, sink_id)


@router.patch("/{sink_id}")
async def update_sink(
    sink_id: IdPath, payload: SinkPatch, session: DbSession, principal: IntegrationsWriter
) -> SinkOut:
    """Change the sink's name, event types, mapping, deletion requests or enabled state;
    re-enabling it tries at once."""
    return await service.update_sink(session, principal, sink_id, payload)


@router.delete("/{sink_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_sink(sink_id: IdPath, session: DbSession, principal: IntegrationsWriter) -> None:
    """Stop forwarding and forget the sink and its delivery log."""
    await service.delete_sink(session, principal, sink_id)


@router.post("/{sink_id}/replay", status_code=status.HTTP_202_ACCEPTED)
async def replay(
    sink_id: IdPath, payload: ReplayRequest, session: DbSession, principal: IntegrationsWriter
) -> SinkOut:
    """Send the events that occurred in a time range again (those the sink had already
    passed). Segment deduplicates what it already has; GA4 does not, so a replay to GA4
    counts those events twice. One replay at a time (409 otherwise)."""
    return await service.request_replay(session, principal, sink_id, payload)


@router.get("/{sink_id}/deliveries")
async def deliveries(
    sink_id: IdPath,
    session: DbSession,
    principal: IntegrationsReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[DeliveryOut]:
    """The delivery log, newest first: each window of the feed sent (or tried), with its
    counts, requests and error."""
    rows = await service.deliveries(
        session, principal, sink_id, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=[service.delivery_out(row) for row in items], pagination=pagination)


@outbound.post("/{sink_id}/dry-run")
async def dry_run(
    sink_id: IdPath,
    payload: DryRunRequest,
    request: Request,
    session: DbSession,
    principal: IntegrationsReader,
) -> DryRunOut:
    """What the sink would send now, as the vendor's requests: for the events it has still
    to send (or those of `since` to `until`), up to `limit`. Nothing is sent or written;
    `validate_requests` asks GA4's validation endpoint about each request."""
    hub: IntegrationHub = request.app.state.integrations
    # What has committed is numbered before reading what the sink has still to send.
    await catch_up(request.app.state.db, session)
    return await service.dry_run(session, hub, principal, sink_id, payload)
