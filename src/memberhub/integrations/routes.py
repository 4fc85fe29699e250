from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select

from memberhub.auth.dependencies import (
    IntegrationsReader,
    IntegrationsWriter,
    MembershipsWriter,
)
from memberhub.integrations import activity_feed, inbound, oauth, service
from memberhub.integrations.activity_mapping import MappingTest, MappingTestOut
from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.mapped_activities import try_mapping
from memberhub.integrations.models import InboundStatus, IntegrationCall
from memberhub.integrations.payments import PaymentUnmatched
from memberhub.integrations.providers import as_payments, get_provider, provider_names
from memberhub.integrations.providers.base import (
    CheckoutRequest,
    ConnectionFailed,
    InboundRequest,
)
from memberhub.integrations.schemas import (
    AuthorizeOut,
    CallbackOut,
    CallOut,
    CheckoutCreate,
    CheckoutOut,
    ConnectionTest,
    HealthOut,
    InboundAccepted,
    InboundEventDetail,
    InboundEventOut,
    IntegrationCreate,
    IntegrationOut,
    IntegrationPatch,
    ProviderOut,
    SyncStatusOut,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.kit.errors import Conflict, MemberhubError, ValidationFailed
from memberhub.kit.http import (
    ERROR_RESPONSES,
    CheckedRoute,
    DbSession,
    UnitOfWorkRoute,
    read_body,
)
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath
from memberhub.members.service import get_member
from memberhub.memberships.service import get_plan
from memberhub.webhooks.ssrf import UrlPolicy


class OutboundRoute(CheckedRoute):
    """For requests that wait on a third party: the request's session only reads (to
    authenticate); the handler writes in short transactions of its own, so no write lock is
    held while a vendor answers. Idempotency-Key is passed on to the vendor rather than
    replayed from storage."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            db: Database = request.app.state.db
            await self.check_before_body(request)
            async with db.read_sessionmaker() as session:
                request.state.session = session
                try:
                    return await original(request)
                finally:
                    await session.rollback()

        return handler


class ProviderError(MemberhubError):
    """The vendor refused the call."""

    code = "PROVIDER_ERROR"
    status_code = 502


class ProviderUnavailable(MemberhubError):
    code = "PROVIDER_UNAVAILABLE"
    status_code = 503


router = APIRouter(
    prefix="/api/v1", tags=["integrations"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)
outbound = APIRouter(
    prefix="/api/v1", tags=["integrations"], route_class=OutboundRoute, responses=ERROR_RESPONSES
)
# Called by providers and browsers, not with API keys: the signature or the OAuth state is
# the credential.
public = APIRouter(prefix="/api/v1", tags=["integrations"], responses=ERROR_RESPONSES)

StatusFilter = Annotated[str | None, Query(pattern="^(" + "|".join(InboundStatus.ALL) + ")$")]
EventTypeFilter = Annotated[str | None, Query(min_length=1, max_length=255)]


def _box(request: Request) -> SecretBox:
    box: SecretBox = request.app.state.secret_box
    return box


def _hub(request: Request) -> IntegrationHub:
    hub: IntegrationHub = request.app.state.integrations
    return hub


def _policy(request: Request) -> UrlPolicy:
    return UrlPolicy.from_settings(request.app.state.settings)


def _public_url(request: Request) -> str:
    url: str = request.app.state.settings.public_url
    return url


async def _out(request: Request, session: DbSession, integration: Any) -> IntegrationOut:
    [out] = await service.to_out_many(session, [integration], public_url=_public_url(request))
    return out


# ---------------------------------------------------------------- registry


@router.get("/integration-providers")
async def list_providers(principal: IntegrationsReader) -> list[ProviderOut]:
    """The providers this installation can connect, with what each can do and the settings
    each takes (JSON Schema)."""
    providers = [get_provider(name) for name in provider_names()]
    return [
        ProviderOut(
            name=p.name,
            title=p.title,
            capabilities=sorted(c.value for c in p.capabilities),
            oauth=p.oauth_defaults is not None or "oauth" in p.config_model.model_fields,
            config_schema=p.config_model.model_json_schema(),
            credentials_schema=p.credentials_model.model_json_schema(),
        )
        for p in providers
        if p is not None
    ]


@router.post("/integrations", status_code=201)
async def create_integration(
    payload: IntegrationCreate,
    request: Request,
    session: DbSession,
    principal: IntegrationsWriter,
    response: Response,
) -> IntegrationOut:
    """Connect a provider. Credentials are stored encrypted and shown only by their last
    four characters from now on."""
    integration = await service.create_integration(
        session, principal, payload, box=_box(request), policy=_policy(request)
    )
    response.headers["Location"] = f"/api/v1/integrations/{integration.public_id}"
    return await _out(request, session, integration)


@router.get("/integrations")
async def list_integrations(
    request: Request,
    session: DbSession,
    principal: IntegrationsReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[IntegrationOut]:
    """Integrations, with their state; credentials only by their last characters."""
    rows = await service.list_integrations(
        session, principal, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    data = await service.to_out_many(session, items, public_url=_public_url(request))
    return Page(data=data, pagination=pagination)


@router.get("/integrations/{integration_id}")
async def get_integration(
    integration_id: IdPath, request: Request, session: DbSession, principal: IntegrationsReader
) -> IntegrationOut:
    """One integration; credentials only by their last characters."""
    return await _out(
        request, session, await service.get_integration(session, principal, integration_id)
    )


@router.patch("/integrations/{integration_id}")
async def update_integration(
    integration_id: IdPath,
    payload: IntegrationPatch,
    request: Request,
    session: DbSession,
    principal: IntegrationsWriter,
) -> IntegrationOut:
    """Change an integration; `{"enabled": false}` disables it (its webhooks are then
    refused with 409 and nothing calls the vendor)."""
    integration = await service.update_integration(
        session, principal, integration_id, payload, box=_box(request), policy=_policy(request)
    )
    return await _out(request, session, integration)


@router.post("/integrations/{integration_id}/disable")
async def disable_integration(
    integration_id: IdPath, request: Request, session: DbSession, principal: IntegrationsWriter
) -> IntegrationOut:
    """Stop an integration: no calls, syncs or inbound processing until it is enabled again."""
    integration = await service.update_integration(
        session,
        principal,
        integration_id,
        IntegrationPatch(enabled=False),
        box=_box(request),
        policy=_policy(request),
    )
    return await _out(request, session, integration)


@outbound.post("/integrations/{integration_id}/test")
async def test_integration(
    integration_id: IdPath, request: Request, session: DbSession, principal: IntegrationsWriter
) -> ConnectionTest:
    """Make one authenticated call to the vendor and report how it went."""
    integration = await service.get_integration(session, principal, integration_id)
    return await service.check_connection(_hub(request), integration)


@router.post("/integrations/{integration_id}/activity-mapping/test")
async def test_activity_mapping(
    integration_id: IdPath, payload: MappingTest, session: DbSession, principal: IntegrationsWriter
) -> MappingTestOut:
    """The activity a sample event body would record under the integration's activity
    mapping (or the `mapping` sent), or the problems that keep it from one; nothing is
    written."""
    integration = await service.get_integration(session, principal, integration_id)
    return try_mapping(integration, payload, now=utcnow())


@outbound.post("/integrations/{integration_id}/import")
async def import_activities(
    integration_id: IdPath, request: Request, session: DbSession, principal: IntegrationsWriter
) -> activity_feed.ImportOut:
    """Read the records the integration's settings choose (Eventbrite: the attendees of its
    events) and record them as activities, each page in its own transaction. Earning rules
    apply to an activity once: importing again replays what was recorded."""
    integration = await service.get_integration(session, principal, integration_id)
    if not integration.enabled:
        raise inbound.IntegrationDisabled()
    hub = _hub(request)
    try:
        counts = await activity_feed.run_import(request.app.state.db, hub, integration)
    except ConnectionFailed as exc:
        raise ProviderError(str(exc)) from None
    except (GatewayError, CircuitOpen) as exc:
        raise ProviderUnavailable(f"{integration.provider} could not be reached: {exc}") from None
    finally:
        await hub.drain()
    return counts.out()


@router.get("/integrations/{integration_id}/health")
async def integration_health(
    integration_id: IdPath, request: Request, session: DbSession, principal: IntegrationsReader
) -> HealthOut:
    """Success rate and latency over the last 24 hours, incidents and mean time to
    recovery over the last 30 days."""
    integration = await service.get_integration(session, principal, integration_id)
    return await service.health(session, integration, hub=_hub(request))


@router.get("/integrations/{integration_id}/calls")
async def list_calls(
    integration_id: IdPath,
    session: DbSession,
    principal: IntegrationsReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[CallOut]:
    """The payload log: outbound calls, newest first, with secrets masked."""
    integration = await service.get_integration(session, principal, integration_id)
    query = (
        select(IntegrationCall)
        .where(IntegrationCall.integration_id == integration.id)
        .order_by(IntegrationCall.id.desc())
        .limit(page.limit + 1)
    )
    if page.after_id is not None:
        query = query.where(IntegrationCall.id < page.after_id)
    items, pagination = build_page(list(await session.scalars(query)), page.limit)
    data = [
        CallOut(
            method=c.method,
            url=c.url,
            outcome=c.outcome,
            status=c.status,
            attempts=c.attempts,
            duration_ms=c.duration_ms,
            started_at=c.started_at,
            request_headers=c.request_headers,
            request_body=c.request_body,
            response_body=c.response_body,
            error=c.error,
        )
        for c in items
    ]
    return Page(data=data, pagination=pagination)


@router.get("/sync/status")
async def sync_status(session: DbSession, principal: IntegrationsReader) -> SyncStatusOut:
    """Every integration at a glance: last sync, pending and failed inbound events, open
    incidents."""
    return await service.sync_status(session, principal)


# ---------------------------------------------------------------- inbound


MAX_INBOUND_BYTES = 1024 * 1024


@public.post("/inbound/{integration_id}", response_model=InboundAccepted)
async def receive_webhook(integration_id: IdPath, request: Request) -> InboundAccepted | Response:
    """Where providers send webhooks. The signature is checked for the integration's
    provider; the event is stored and processed by the worker. A repeat of an event
    already received is answered 200 with `duplicate` and not processed again. Xero's
    webhooks are answered 200, or 401 for a bad signature, with an empty body, as its
    intent-to-receive check requires."""
    body = await read_body(request, MAX_INBOUND_BYTES)
    try:
        received = await inbound.receive(
            request.app.state.db,
            _box(request),
            integration_id,
            InboundRequest(
                method=request.method,
                url=str(request.url),
                headers=dict(request.headers),
                body=bytes(body),
                now=time.time(),
            ),
            source_ip=request.client.host if request.client else None,
        )
    except inbound.SignatureRejected as exc:
        if exc.bare:
            return Response(status_code=401)
        raise
    if received.bare:
        return Response(status_code=200)
    return InboundAccepted(
        id=received.event.public_id, status="duplicate" if received.duplicate else "accepted"
    )


@public.get("/inbound/{integration_id}", status_code=200, response_class=Response)
async def check_webhook_url(integration_id: IdPath, request: Request) -> Response:
    """Providers that check a webhook URL before posting to it (Mailchimp sends a GET) are
    answered 200 when the URL carries the integration's secret; others get 404."""
    await inbound.check_url(
        request.app.state.db,
        _box(request),
        integration_id,
        InboundRequest(
            method="GET",
            url=str(request.url),
            headers=dict(request.headers),
            body=b"",
            now=time.time(),
        ),
    )
    return Response(status_code=200)


@router.get("/integrations/{integration_id}/inbound-events")
async def list_inbound_events(
    integration_id: IdPath,
    session: DbSession,
    principal: IntegrationsReader,
    page: Annotated[PageParams, Depends(page_params)],
    status: StatusFilter = None,
    event_type: EventTypeFilter = None,
) -> Page[InboundEventOut]:
    """What arrived, newest first, and how each was processed."""
    integration = await service.get_integration(session, principal, integration_id)
    rows = await service.list_inbound(
        session,
        integration,
        status=status,
        event_type=event_type,
        after_id=page.after_id,
        limit=page.limit,
    )
    items, pagination = build_page(rows, page.limit)
    return Page(
        data=[service.inbound_out(e, integration.public_id) for e in items],
        pagination=pagination,
    )


@router.get("/inbound-events/{event_id}")
async def get_inbound_event(
    event_id: IdPath, session: DbSession, principal: IntegrationsReader
) -> InboundEventDetail:
    """One inbound event with its body as received and its headers (signatures masked)."""
    event, integration = await service.get_inbound(session, principal, event_id)
    return service.inbound_detail(event, integration.public_id)


@router.post("/inbound-events/{event_id}/retry", status_code=202)
async def retry_inbound_event(
    event_id: IdPath, session: DbSession, principal: IntegrationsWriter
) -> InboundEventOut:
    """Process a failed or ignored event again (after fixing what made it fail)."""
    event, integration = await service.get_inbound(session, principal, event_id)
    if event.status == InboundStatus.PENDING:
        raise Conflict("The event is waiting to be processed already.", code="ALREADY_PENDING")
    if event.status == InboundStatus.PROCESSED:
        raise Conflict(
            "The event was processed; it is not applied twice.", code="ALREADY_PROCESSED"
        )
    await inbound.retry(session, event)
    await session.refresh(event)
    return service.inbound_out(event, integration.public_id)


# ---------------------------------------------------------------- OAuth


@router.get("/integrations/{integration_id}/oauth/authorize")
async def oauth_authorize(
    integration_id: IdPath, request: Request, session: DbSession, principal: IntegrationsWriter
) -> AuthorizeOut:
    """Start an OAuth connection: send the user to `authorization_url` (valid 10 minutes).
    The provider sends them back to …/oauth/callback, which stores the tokens."""
    integration = await service.get_integration(session, principal, integration_id)
    return await oauth.authorize(
        request.app.state.db,
        _box(request),
        principal,
        integration,
        public_url=_public_url(request),
    )


@public.get("/integrations/{integration_id}/oauth/callback")
async def oauth_callback(
    integration_id: IdPath,
    request: Request,
    code: Annotated[str | None, Query(max_length=2048)] = None,
    state: Annotated[str | None, Query(max_length=512)] = None,
    error: Annotated[str | None, Query(max_length=512)] = None,
) -> CallbackOut:
    """The provider's redirect after the user approved: exchanges the code for tokens."""
    return await oauth.callback(
        request.app.state.db,
        _box(request),
        _hub(request),
        integration_id,
        code=code,
        state=state,
        error=error,
    )


# ---------------------------------------------------------------- payments


@outbound.post("/integrations/{integration_id}/checkout-sessions", status_code=201)
async def create_checkout(
    integration_id: IdPath,
    payload: CheckoutCreate,
    request: Request,
    session: DbSession,
    principal: MembershipsWriter,
) -> CheckoutOut:
    """A hosted checkout for a member to pay for a plan. The vendor's customer is created
    for the member the first time. The payment, when made, joins or renews the member
    through the integration's webhooks."""
    integration = await service.get_integration(session, principal, integration_id)
    provider = get_provider(integration.provider)
    payments = as_payments(provider) if provider is not None else None
    if payments is None:
        raise ValidationFailed(
            f"{integration.provider} integrations take no payments.", code="NOT_A_PAYMENTS_PROVIDER"
        )
    if not integration.enabled:
        raise inbound.IntegrationDisabled()
    member = await get_member(session, principal, payload.member_id)
    plan = await get_plan(session, principal, payload.plan_id)
    if not plan.active:
        raise Conflict(f"Plan {plan.public_id} is no longer offered.", code="PLAN_INACTIVE")
    hub = _hub(request)
    connection = hub.connection(integration)
    price_plans: dict[str, str] = dict(getattr(connection.config, "price_plans", {}) or {})
    price_id = next(
        (price for price, ref in price_plans.items() if ref in (plan.public_id, plan.code)), None
    )
    customer_id = member.external_ids.get(integration.provider)
    try:
        if not customer_id:
            customer_id = await payments.create_customer(
                connection,
                member_id=member.public_id,
                email=member.email,
                name=" ".join(p for p in (member.first_name, member.last_name) if p) or None,
            )
            await _remember_customer(
                request.app.state.db, member.public_id, integration.provider, customer_id
            )
        key = request.headers.get("idempotency-key") or uuid.uuid4().hex
        result = await payments.create_checkout(
            connection,
            CheckoutRequest(
                customer_id=customer_id,
                member_id=member.public_id,
                plan_id=plan.public_id,
                plan_name=plan.name,
                amount=plan.price_amount,
                currency=plan.currency,
                term_months=plan.term_months,
                success_url=payload.success_url,
                cancel_url=payload.cancel_url,
                price_id=price_id,
                idempotency_key=f"memberhub-checkout-{key}",
            ),
        )
    except ConnectionFailed as exc:
        raise ProviderError(str(exc)) from None
    except Exception as exc:
        if isinstance(exc, MemberhubError):
            raise
        raise ProviderUnavailable(f"{integration.provider} could not be reached: {exc}") from None
    finally:
        await hub.drain()
    return CheckoutOut(id=result.id, url=result.url, mode=result.mode, customer_id=customer_id)


async def _remember_customer(db: Database, member_id: str, provider: str, customer: str) -> None:
    from memberhub.members.repository import MemberRepository

    async with db.transaction() as session:
        member = await MemberRepository(session).get_by_public_id(member_id, for_update=True)
        if member is None:
            raise PaymentUnmatched(f"Member {member_id} no longer exists.")
        member.external_ids = {**member.external_ids, provider: customer}
