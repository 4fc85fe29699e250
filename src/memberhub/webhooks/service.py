"""Webhook endpoints and their deliveries, as the API sees them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.alerts.models import AlertType
from memberhub.alerts.service import raise_alert
from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.events.catalog import WebhookEndpointDisabled, WebhookTest
from memberhub.events.models import Event
from memberhub.events.sequencer import sequence_pending
from memberhub.events.service import emit
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.errors import Conflict, NotFound
from memberhub.kit.ids import new_public_id
from memberhub.kit.pagination import Page, build_page
from memberhub.members.service import resolve_organisation
from memberhub.organisations.models import Organisation
from memberhub.organisations.repository import OrganisationRepository
from memberhub.webhooks import ssrf
from memberhub.webhooks.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from memberhub.webhooks.schemas import (
    AttemptOut,
    DeliveryOut,
    EndpointCreate,
    EndpointOut,
    EndpointPatch,
    EndpointWithSecret,
)
from memberhub.webhooks.signing import checked_event_types, new_secret

ROTATION_OVERLAP = timedelta(hours=24)


class EndpointNotFound(NotFound):
    code = "WEBHOOK_ENDPOINT_NOT_FOUND"


class DeliveryNotFound(NotFound):
    code = "DELIVERY_NOT_FOUND"


class EndpointDisabled(Conflict):
    code = "WEBHOOK_ENDPOINT_DISABLED"
    default_message = "The endpoint is disabled; enable it first."


# ---------------------------------------------------------------- endpoints


async def get_endpoint(
    session: AsyncSession, principal: Principal, public_id: str, *, for_update: bool = False
) -> WebhookEndpoint:
    query = select(WebhookEndpoint).where(WebhookEndpoint.public_id == public_id)
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    endpoint = await session.scalar(query)
    if endpoint is None or not principal.can_see_organisation(endpoint.organisation_id):
        raise EndpointNotFound(f"Webhook endpoint {public_id} does not exist.")
    return endpoint


async def create_endpoint(
    session: AsyncSession,
    principal: Principal,
    payload: EndpointCreate,
    *,
    policy: ssrf.UrlPolicy,
    box: SecretBox,
) -> EndpointWithSecret:
    event_types = checked_event_types(payload.event_types)
    organisation = await resolve_organisation(session, principal, payload.organisation_id)
    await ssrf.check_url(payload.url, policy)
    secret = new_secret()
    now = utcnow()
    # Events committed before now are numbered first, so "after the endpoint was created"
    # means what it says (this holds the sequencer until the endpoint commits: a rare write).
    await sequence_pending(session)
    last_position = await session.scalar(select(func.max(Event.position)))
    endpoint = WebhookEndpoint(
        public_id=new_public_id("whk"),
        organisation_id=organisation.id if organisation is not None else None,
        url=payload.url,
        description=payload.description,
        event_types={"types": event_types},
        ordered=payload.ordered,
        rate_limit=payload.rate_limit,
        enabled=True,
        secret=box.encrypt(secret),
        after_position=last_position or 0,
        created_at=now,
        updated_at=now,
    )
    session.add(endpoint)
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="webhook_endpoint.create",
        object_type="webhook_endpoint",
        object_id=endpoint.public_id,
        changes=_snapshot(endpoint, organisation),
    )
    out = to_out(endpoint, organisation.public_id if organisation else None)
    return EndpointWithSecret(**out.model_dump(), secret=secret)


def _snapshot(endpoint: WebhookEndpoint, organisation: Organisation | None) -> dict[str, Any]:
    return {
        "url": endpoint.url,
        "description": endpoint.description,
        "event_types": endpoint.event_types["types"],
        "organisation_id": organisation.public_id if organisation else None,
        "ordered": endpoint.ordered,
        "rate_limit": endpoint.rate_limit,
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,
    }


async def update_endpoint(
    session: AsyncSession,
    principal: Principal,
    public_id: str,
    payload: EndpointPatch,
    *,
    policy: ssrf.UrlPolicy,
) -> WebhookEndpoint:
    changes = payload.model_dump(exclude_unset=True)
    if "event_types" in changes:
        changes["event_types"] = {"types": checked_event_types(changes["event_types"])}
    # Resolved before the endpoint is locked: a slow name server holds up nothing else.
    await get_endpoint(session, principal, public_id)
    if "url" in changes:
        await ssrf.check_url(changes["url"], policy)
    if changes.keys() & {"enabled", "event_types"}:
        # Events committed before the change go where the endpoint stood then. (Imported
        # here: the delivery loop uses this module.)
        from memberhub.webhooks.delivery import fan_out_before_change

        await fan_out_before_change(session, utcnow())
    endpoint = await get_endpoint(session, principal, public_id, for_update=True)
    organisation = await _endpoint_organisation(session, endpoint)
    before = _snapshot(endpoint, organisation)
    now = utcnow()
    enabled = changes.pop("enabled", None)
    reason = changes.pop("disabled_reason", None)
    for field, value in changes.items():
        setattr(endpoint, field, value)
    if enabled is True and not endpoint.enabled:
        endpoint.enabled = True
        endpoint.disabled_reason = None
        endpoint.disabled_at = None
        # A fresh start: the failures that led to disabling no longer count.
        endpoint.failing_since = None
    elif enabled is False and endpoint.enabled:
        await disable_endpoint(session, endpoint, reason or "Disabled through the API.", now=now)
    changed = diff(before, _snapshot(endpoint, organisation))
    if changed:
        endpoint.updated_at = now
        await session.flush()
        record_write(
            session,
            principal.actor,
            action="webhook_endpoint.update",
            object_type="webhook_endpoint",
            object_id=endpoint.public_id,
            changes=changed,
        )
    return endpoint


async def delete_endpoint(session: AsyncSession, principal: Principal, public_id: str) -> None:
    endpoint = await get_endpoint(session, principal, public_id, for_update=True)
    await session.delete(endpoint)
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="webhook_endpoint.delete",
        object_type="webhook_endpoint",
        object_id=public_id,
        changes={},
    )


async def rotate_secret(
    session: AsyncSession, principal: Principal, public_id: str, *, box: SecretBox
) -> EndpointWithSecret:
    """A new secret; the current one stays valid, and is signed with too, for 24 hours."""
    endpoint = await get_endpoint(session, principal, public_id, for_update=True)
    secret = new_secret()
    now = utcnow()
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_expires_at = now + ROTATION_OVERLAP
    endpoint.secret = box.encrypt(secret)
    endpoint.updated_at = now
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="webhook_endpoint.rotate_secret",
        object_type="webhook_endpoint",
        object_id=endpoint.public_id,
        changes={"previous_secret_expires_at": endpoint.previous_secret_expires_at},
    )
    organisation = await _endpoint_organisation(session, endpoint)
    out = to_out(endpoint, organisation.public_id if organisation else None)
    return EndpointWithSecret(**out.model_dump(), secret=secret)


async def send_test(
    session: AsyncSession, principal: Principal, public_id: str, message: str
) -> Event:
    """A `webhook.test` event, delivered to this endpoint only, through the usual path."""
    endpoint = await get_endpoint(session, principal, public_id)
    if not endpoint.enabled:
        raise EndpointDisabled()
    return emit(
        session,
        WebhookTest(endpoint_id=endpoint.public_id, message=message),
        organisation_id=endpoint.organisation_id,
    )


async def disable_endpoint(
    session: AsyncSession, endpoint: WebhookEndpoint, reason: str, *, now: datetime
) -> None:
    """Disable, fail what is waiting for it (recoverable later), emit
    `webhook.endpoint.disabled` and raise an alert. A delivery being sent right now keeps
    its claim: if the receiver accepts it, the worker records it as succeeded (not as a
    failure for `recover` to send again)."""
    endpoint.enabled = False
    endpoint.disabled_reason = reason[:500]
    endpoint.disabled_at = now
    endpoint.updated_at = now
    await session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint_id == endpoint.id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
        )
        .values(
            status=DeliveryStatus.FAILED,
            next_attempt_at=None,
            completed_at=now,
            last_error=f"The endpoint was disabled: {reason}"[:500],
        )
    )
    emit(
        session,
        WebhookEndpointDisabled(
            endpoint_id=endpoint.public_id,
            # Sent to every endpoint subscribed to it, often another party's: the URL
            # without its path and query, which often carry a token.
            url=_shown(endpoint.url),
            reason=reason,
            disabled_at=now,
        ),
        organisation_id=endpoint.organisation_id,
        occurred_at=now,
    )
    await raise_alert(
        session,
        AlertType.WEBHOOK_ENDPOINT_DISABLED,
        member=None,
        dedupe_key=f"webhook-disabled:{endpoint.public_id}:{now.isoformat()}",
        message=f"Webhook endpoint {endpoint.public_id} was disabled: {reason}"[:1000],
        now=now,
        # Alerts are read by roles that may not read endpoints: the host only, not the
        # URL, whose path often carries a token (a chat service's incoming webhook).
        data={"endpoint_id": endpoint.public_id, "host": _origin(endpoint.url), "reason": reason},
    )


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _shown(url: str) -> str:
    """The URL as others may see it: its origin, then `/…` where a path or query was."""
    parts = urlsplit(url)
    hidden = parts.path not in ("", "/") or parts.query
    return _origin(url) + ("/…" if hidden else "/")


async def list_endpoints(
    session: AsyncSession, principal: Principal, *, after_id: int | None, limit: int
) -> Sequence[WebhookEndpoint]:
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.id).limit(limit + 1)
    if after_id is not None:
        query = query.where(WebhookEndpoint.id > after_id)
    if principal.visible_organisation_ids is not None:
        query = query.where(WebhookEndpoint.organisation_id.in_(principal.visible_organisation_ids))
    return (await session.scalars(query)).all()


async def _endpoint_organisation(
    session: AsyncSession, endpoint: WebhookEndpoint
) -> Organisation | None:
    if endpoint.organisation_id is None:
        return None
    return await session.get(Organisation, endpoint.organisation_id)


async def organisation_public_ids(
    session: AsyncSession, endpoints: Sequence[WebhookEndpoint]
) -> dict[int, str]:
    ids = {e.organisation_id for e in endpoints if e.organisation_id is not None}
    return await OrganisationRepository(session).public_ids(ids)


def to_out(endpoint: WebhookEndpoint, organisation_public_id: str | None) -> EndpointOut:
    now = utcnow()
    rotating = (
        endpoint.previous_secret_expires_at
        if endpoint.previous_secret_expires_at is not None
        and endpoint.previous_secret_expires_at > now
        else None
    )
    return EndpointOut(
        id=endpoint.public_id,
        url=endpoint.url,
        description=endpoint.description,
        event_types=endpoint.event_types["types"],
        organisation_id=organisation_public_id,
        ordered=endpoint.ordered,
        rate_limit=endpoint.rate_limit,
        enabled=endpoint.enabled,
        disabled_reason=endpoint.disabled_reason,
        disabled_at=endpoint.disabled_at,
        failing_since=endpoint.failing_since,
        last_success_at=endpoint.last_success_at,
        last_failure_at=endpoint.last_failure_at,
        previous_secret_expires_at=rotating,
        created_at=endpoint.created_at,
        updated_at=endpoint.updated_at,
    )


# ---------------------------------------------------------------- deliveries


async def list_deliveries(
    session: AsyncSession,
    *,
    endpoint_id: int | None = None,
    event_id: int | None = None,
    status: str | None = None,
    organisation_ids: frozenset[int] | None = None,
    after_id: int | None,
    limit: int,
) -> Page[DeliveryOut]:
    """Newest first, with their attempts. `after_id` pages towards older deliveries."""
    query = (
        select(WebhookDelivery, WebhookEndpoint.public_id, Event.public_id, Event.type)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .join(Event, Event.id == WebhookDelivery.event_id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit + 1)
    )
    if endpoint_id is not None:
        query = query.where(WebhookDelivery.endpoint_id == endpoint_id)
    if event_id is not None:
        query = query.where(WebhookDelivery.event_id == event_id)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if organisation_ids is not None:
        query = query.where(WebhookEndpoint.organisation_id.in_(organisation_ids))
    if after_id is not None:
        query = query.where(WebhookDelivery.id < after_id)
    rows = (await session.execute(query)).all()
    deliveries, pagination = build_page([row[0] for row in rows], limit)
    attempts = await _attempts_of(session, [delivery.id for delivery in deliveries])
    return Page(
        data=[
            _delivery_out(delivery, endpoint_public_id, event_public_id, event_type, attempts)
            for delivery, endpoint_public_id, event_public_id, event_type in rows[: len(deliveries)]
        ],
        pagination=pagination,
    )


async def _attempts_of(
    session: AsyncSession, delivery_ids: list[int]
) -> dict[int, list[WebhookAttempt]]:
    by_delivery: dict[int, list[WebhookAttempt]] = {i: [] for i in delivery_ids}
    if not delivery_ids:
        return by_delivery
    rows = await session.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id.in_(delivery_ids))
        .order_by(WebhookAttempt.delivery_id, WebhookAttempt.number, WebhookAttempt.id)
    )
    for attempt in rows:
        by_delivery[attempt.delivery_id].append(attempt)
    return by_delivery


def _delivery_out(
    delivery: WebhookDelivery,
    endpoint_public_id: str,
    event_public_id: str,
    event_type: str,
    attempts: dict[int, list[WebhookAttempt]],
) -> DeliveryOut:
    pending = delivery.status == DeliveryStatus.PENDING
    return DeliveryOut(
        id=delivery.public_id,
        endpoint_id=endpoint_public_id,
        event_id=event_public_id,
        event_type=event_type,
        status=delivery.status,
        attempt_count=delivery.attempt_count,
        next_attempt_at=delivery.next_attempt_at if pending else None,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        created_at=delivery.created_at,
        completed_at=delivery.completed_at,
        attempts=[
            AttemptOut(
                number=a.number,
                started_at=a.started_at,
                duration_ms=a.duration_ms,
                succeeded=a.succeeded,
                status_code=a.status_code,
                response_body=a.response_body,
                error=a.error,
            )
            for a in attempts.get(delivery.id, [])
        ],
    )


async def get_delivery(
    session: AsyncSession, principal: Principal, public_id: str
) -> tuple[WebhookDelivery, WebhookEndpoint]:
    row = (
        await session.execute(
            select(WebhookDelivery, WebhookEndpoint)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(WebhookDelivery.public_id == public_id)
        )
    ).first()
    if row is None or not principal.can_see_organisation(row[1].organisation_id):
        raise DeliveryNotFound(f"Delivery {public_id} does not exist.")
    return row[0], row[1]


async def delivery_out(session: AsyncSession, delivery: WebhookDelivery) -> DeliveryOut:
    endpoint_public_id = await session.scalar(
        select(WebhookEndpoint.public_id).where(WebhookEndpoint.id == delivery.endpoint_id)
    )
    event = await session.get(Event, delivery.event_id)
    assert endpoint_public_id is not None
    assert event is not None
    attempts = await _attempts_of(session, [delivery.id])
    return _delivery_out(delivery, endpoint_public_id, event.public_id, event.type, attempts)


def _requeue_values(now: datetime, schedule_length: int) -> dict[str, Any]:
    # One more attempt, now; `schedule_index` past the schedule makes it the last one.
    return {
        "status": DeliveryStatus.PENDING,
        "next_attempt_at": now,
        "schedule_index": schedule_length,
        "completed_at": None,
        "claimed_by": None,
        "claim_token": None,
    }


async def retry_delivery(
    session: AsyncSession, principal: Principal, public_id: str, *, schedule_length: int
) -> WebhookDelivery:
    """Send a delivery once more, now. A delivery still waiting for a retry is brought
    forward; a successful one is sent again (the receiver deduplicates on its id)."""
    delivery, endpoint = await get_delivery(session, principal, public_id)
    if not endpoint.enabled:
        raise EndpointDisabled()
    now = utcnow()
    values = _requeue_values(now, schedule_length)
    if delivery.status == DeliveryStatus.PENDING:
        # Brought forward: the retries it has left stay.
        values["schedule_index"] = delivery.schedule_index
    # Not while a worker holds it: checked in the statement itself, so a claim made
    # meanwhile cannot be overridden.
    result = await session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery.id,
            or_(
                WebhookDelivery.claim_token.is_(None),
                WebhookDelivery.next_attempt_at.is_(None),
                WebhookDelivery.next_attempt_at <= now,
            ),
        )
        .values(**values)
    )
    if not getattr(result, "rowcount", 0):
        raise Conflict("The delivery is being attempted right now.", code="DELIVERY_IN_PROGRESS")
    record_write(
        session,
        principal.actor,
        action="webhook_delivery.retry",
        object_type="webhook_delivery",
        object_id=delivery.public_id,
        changes={"status": {"from": delivery.status, "to": DeliveryStatus.PENDING}},
    )
    await session.refresh(delivery)
    return delivery


async def recover(
    session: AsyncSession,
    principal: Principal,
    public_id: str,
    *,
    since: datetime,
    until: datetime | None,
    schedule_length: int,
) -> int:
    """Queue every failed delivery of the endpoint created in [since, until) once more."""
    endpoint = await get_endpoint(session, principal, public_id, for_update=True)
    if not endpoint.enabled:
        raise EndpointDisabled()
    now = utcnow()
    query = (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint_id == endpoint.id,
            WebhookDelivery.status == DeliveryStatus.FAILED,
            WebhookDelivery.created_at >= since,
            WebhookDelivery.created_at < (until or now),
        )
        .values(**_requeue_values(now, schedule_length))
    )
    result = await session.execute(query)
    count = int(getattr(result, "rowcount", 0) or 0)
    record_write(
        session,
        principal.actor,
        action="webhook_endpoint.recover",
        object_type="webhook_endpoint",
        object_id=endpoint.public_id,
        changes={"since": since, "until": until or now, "requeued": count},
    )
    return count
