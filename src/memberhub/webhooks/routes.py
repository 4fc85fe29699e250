from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request, Response, status
from pydantic import BaseModel

from memberhub.auth.dependencies import EventsReader, WebhooksReader, WebhooksWriter
from memberhub.auth.roles import Scope
from memberhub.events.repository import EventRepository
from memberhub.kit.crypto import SecretBox
from memberhub.kit.errors import NotFound
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath
from memberhub.webhooks import service
from memberhub.webhooks.models import DeliveryStatus, WebhookEndpoint
from memberhub.webhooks.schemas import (
    DeliveryOut,
    EndpointCreate,
    EndpointOut,
    EndpointPatch,
    EndpointWithSecret,
    RecoverOut,
    RecoverRequest,
    TestRequest,
)
from memberhub.webhooks.ssrf import UrlPolicy

router = APIRouter(
    prefix="/api/v1", tags=["webhooks"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)

StatusFilter = Annotated[str | None, Query(pattern="^(" + "|".join(DeliveryStatus.ALL) + ")$")]


class TestSent(BaseModel):
    event_id: str


def _policy(request: Request) -> UrlPolicy:
    return UrlPolicy.from_settings(request.app.state.settings)


def _box(request: Request) -> SecretBox:
    box: SecretBox = request.app.state.secret_box
    return box


def _schedule_length(request: Request) -> int:
    return len(request.app.state.settings.webhook_retry_delays)


async def _out(session: DbSession, endpoint: WebhookEndpoint) -> EndpointOut:
    organisations = await service.organisation_public_ids(session, [endpoint])
    return service.to_out(endpoint, organisations.get(endpoint.organisation_id or 0))


@router.post("/webhook-endpoints", status_code=201)
async def create_endpoint(
    payload: EndpointCreate,
    request: Request,
    session: DbSession,
    principal: WebhooksWriter,
    response: Response,
) -> EndpointWithSecret:
    """Register an endpoint. The signing secret is in the response, and only there. The URL
    must resolve to public addresses (see MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS)."""
    created = await service.create_endpoint(
        session, principal, payload, policy=_policy(request), box=_box(request)
    )
    response.headers["Location"] = f"/api/v1/webhook-endpoints/{created.id}"
    return created


@router.get("/webhook-endpoints")
async def list_endpoints(
    session: DbSession,
    principal: WebhooksReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[EndpointOut]:
    """Webhook endpoints, with their state and health."""
    rows = await service.list_endpoints(
        session, principal, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    organisations = await service.organisation_public_ids(session, items)
    return Page(
        data=[service.to_out(e, organisations.get(e.organisation_id or 0)) for e in items],
        pagination=pagination,
    )


@router.get("/webhook-endpoints/{endpoint_id}")
async def get_endpoint(
    endpoint_id: IdPath, session: DbSession, principal: WebhooksReader
) -> EndpointOut:
    """One webhook endpoint (its secret is never shown again)."""
    return await _out(session, await service.get_endpoint(session, principal, endpoint_id))


@router.patch("/webhook-endpoints/{endpoint_id}")
async def update_endpoint(
    endpoint_id: IdPath,
    payload: EndpointPatch,
    request: Request,
    session: DbSession,
    principal: WebhooksWriter,
) -> EndpointOut:
    """Change an endpoint; `{"enabled": true}` re-enables one that was disabled. Events
    that happened while it was disabled are not sent to it; the deliveries that failed when
    it was disabled can be sent again with `POST …/recover`."""
    endpoint = await service.update_endpoint(
        session, principal, endpoint_id, payload, policy=_policy(request)
    )
    return await _out(session, endpoint)


@router.delete("/webhook-endpoints/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_endpoint(
    endpoint_id: IdPath, session: DbSession, principal: WebhooksWriter
) -> None:
    """Delete the endpoint with its deliveries and their attempts."""
    await service.delete_endpoint(session, principal, endpoint_id)


@router.post("/webhook-endpoints/{endpoint_id}/rotate-secret")
async def rotate_secret(
    endpoint_id: IdPath, request: Request, session: DbSession, principal: WebhooksWriter
) -> EndpointWithSecret:
    """A new secret, returned once. For 24 hours every delivery is signed with both the new
    and the previous secret, so receivers can switch over without losing one."""
    return await service.rotate_secret(session, principal, endpoint_id, box=_box(request))


@router.post("/webhook-endpoints/{endpoint_id}/test", status_code=202)
async def send_test(
    endpoint_id: IdPath,
    session: DbSession,
    principal: WebhooksWriter,
    payload: Annotated[TestRequest | None, Body()] = None,
) -> TestSent:
    """Send a `webhook.test` event to this endpoint only; follow it under …/deliveries."""
    message = (payload or TestRequest()).message
    event = await service.send_test(session, principal, endpoint_id, message)
    return TestSent(event_id=event.public_id)


@router.get("/webhook-endpoints/{endpoint_id}/deliveries")
async def list_endpoint_deliveries(
    endpoint_id: IdPath,
    session: DbSession,
    principal: WebhooksReader,
    page: Annotated[PageParams, Depends(page_params)],
    status: StatusFilter = None,
) -> Page[DeliveryOut]:
    """The endpoint's deliveries, newest first, each with its attempts."""
    endpoint = await service.get_endpoint(session, principal, endpoint_id)
    return await service.list_deliveries(
        session, endpoint_id=endpoint.id, status=status, after_id=page.after_id, limit=page.limit
    )


@router.post("/webhook-endpoints/{endpoint_id}/recover")
async def recover_endpoint(
    endpoint_id: IdPath,
    payload: RecoverRequest,
    request: Request,
    session: DbSession,
    principal: WebhooksWriter,
) -> RecoverOut:
    """Send every failed delivery created in [since, until) once more."""
    count = await service.recover(
        session,
        principal,
        endpoint_id,
        since=payload.since,
        until=payload.until,
        schedule_length=_schedule_length(request),
    )
    return RecoverOut(requeued=count)


@router.get("/events/{event_id}/deliveries")
async def list_event_deliveries(
    event_id: IdPath,
    session: DbSession,
    principal: EventsReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[DeliveryOut]:
    """Where the event was delivered, with every attempt (needs `webhooks:read` too: the
    attempts hold the receivers' answers)."""
    principal.require_scope(Scope.WEBHOOKS_READ)
    event = await EventRepository(session).get_by_public_id(event_id)
    if event is None or not principal.can_see_organisation(event.organisation_id):
        raise NotFound(f"Event {event_id} does not exist.")
    return await service.list_deliveries(
        session,
        event_id=event.id,
        organisation_ids=principal.visible_organisation_ids,
        after_id=page.after_id,
        limit=page.limit,
    )


@router.get("/deliveries/{delivery_id}")
async def get_delivery(
    delivery_id: IdPath, session: DbSession, principal: WebhooksReader
) -> DeliveryOut:
    """One delivery and its attempts."""
    delivery, _ = await service.get_delivery(session, principal, delivery_id)
    return await service.delivery_out(session, delivery)


@router.post("/deliveries/{delivery_id}/retry", status_code=202)
async def retry_delivery(
    delivery_id: IdPath, request: Request, session: DbSession, principal: WebhooksWriter
) -> DeliveryOut:
    """Attempt the delivery once more, now (also one that succeeded: the receiver
    deduplicates on `webhook-id`)."""
    delivery = await service.retry_delivery(
        session, principal, delivery_id, schedule_length=_schedule_length(request)
    )
    return await service.delivery_out(session, delivery)
