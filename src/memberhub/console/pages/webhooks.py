"""Webhook endpoints: the list with each endpoint's state and health, registration, and an
endpoint's page with its deliveries and their attempts, where a delivery is retried, a
window of failed deliveries recovered, the endpoint enabled or disabled, its secret rotated
and a test event sent. As `/api/v1/webhook-endpoints`: `webhooks:read` to look,
`webhooks:write` to change, the same schemas, services and URL policy (a URL reaching a
private network is refused with the API's message), and the same organisation reach.

A signing secret (on registration or rotation) is shown on the page that answers the form
and nowhere else: not in the session's flash message, not in a redirect, not in the logs.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Form, Query, Request
from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from memberhub.auth.principal import Principal
from memberhub.auth.roles import Scope
from memberhub.console.session import console_session
from memberhub.console.web import ConsoleDb, ConsoleRoute, SignedInStaff, redirect, render
from memberhub.kit.crypto import SecretBox
from memberhub.kit.errors import MemberhubError, ValidationFailed
from memberhub.kit.pagination import build_page, cursor_after_id
from memberhub.kit.types import IdPath
from memberhub.webhooks import service
from memberhub.webhooks.models import DeliveryStatus
from memberhub.webhooks.schemas import (
    MAX_RATE_LIMIT,
    EndpointCreate,
    EndpointPatch,
    EndpointWithSecret,
    RecoverRequest,
    TestRequest,
)
from memberhub.webhooks.ssrf import UrlPolicy

router = APIRouter(prefix="/console/webhooks", route_class=ConsoleRoute, include_in_schema=False)

ENDPOINTS_PER_PAGE = 25
DELIVERIES_PER_PAGE = 20
Cursor = Annotated[str | None, Query(max_length=512)]
DeliveryStatusFilter = Annotated[
    str | None, Query(pattern="^(" + "|".join(DeliveryStatus.ALL) + ")$")
]
# Event type patterns as typed in the form: separated by commas, spaces or lines.
_PATTERN_SEPARATORS = re.compile(r"[\s,]+")


def _policy(request: Request) -> UrlPolicy:
    return UrlPolicy.from_settings(request.app.state.settings)


def _box(request: Request) -> SecretBox:
    box: SecretBox = request.app.state.secret_box
    return box


def _schedule_length(request: Request) -> int:
    return len(request.app.state.settings.webhook_retry_delays)


M = TypeVar("M", bound=BaseModel)


def _validated(schema: type[M], fields: dict[str, Any]) -> M:
    """The form's fields as the API's request schema, or a 422 naming what is wrong."""
    try:
        return schema.model_validate(fields)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
            message = (
                "contains characters that are not allowed here"
                if error["type"] == "string_pattern_mismatch"
                else str(error["msg"]).removeprefix("Value error, ")
            )
            problems.append(f"{where}: {message}" if where else message)
        raise ValidationFailed(
            "Check the form: " + "; ".join(problems) + ".",
            details={"fields": [list(map(str, e["loc"])) for e in exc.errors()[:20]]},
        ) from None


def _endpoint_page(endpoint_id: str) -> str:
    return f"/console/webhooks/{endpoint_id}"


def _shown_secret(request: Request, created: EndpointWithSecret, *, rotated: bool) -> Response:
    """The one page that shows a new secret (never cached: console pages are no-store)."""
    return render(
        request,
        "webhook_secret.html",
        {
            "title": "Secret rotated" if rotated else "Endpoint registered",
            "endpoint": created,
            "rotated": rotated,
        },
        status_code=200 if rotated else 201,
    )


# ---------------------------------------------------------------- endpoints


@router.get("")
async def list_endpoints(
    request: Request, session: ConsoleDb, signed_in: SignedInStaff, cursor: Cursor = None
) -> Response:
    """As `GET /api/v1/webhook-endpoints`, with the registration form for writers."""
    signed_in.principal.require_scope(Scope.WEBHOOKS_READ)
    return await _list_page(request, session, signed_in.principal, cursor=cursor)


async def _list_page(
    request: Request,
    session: AsyncSession,
    principal: Principal,
    *,
    cursor: str | None = None,
    error: str | None = None,
    form: dict[str, Any] | None = None,
    status_code: int = 200,
) -> Response:
    """The list and the registration form; after a refused registration, the reason and
    what was typed."""
    rows = await service.list_endpoints(
        session, principal, after_id=cursor_after_id(cursor), limit=ENDPOINTS_PER_PAGE
    )
    items, pagination = build_page(rows, ENDPOINTS_PER_PAGE)
    organisations = await service.organisation_public_ids(session, items)
    return render(
        request,
        "webhooks.html",
        {
            "title": "Webhooks",
            "endpoints": [
                service.to_out(e, organisations.get(e.organisation_id or 0)) for e in items
            ],
            "next_cursor": pagination.next_cursor,
            "can_write": Scope.WEBHOOKS_WRITE in principal.scopes,
            "bound": principal.organisation_id is not None,
            "max_rate_limit": MAX_RATE_LIMIT,
            "error": error,
            "form": form or {},
        },
        status_code=status_code,
    )


@router.post("")
async def create_endpoint(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    url: Annotated[str, Form(max_length=2048)],
    event_types: Annotated[str, Form(max_length=8000)],
    description: Annotated[str, Form(max_length=500)] = "",
    organisation_id: Annotated[str, Form(max_length=45)] = "",
    ordered: Annotated[bool, Form()] = False,
    rate_limit: Annotated[int | None, Form(ge=1, le=MAX_RATE_LIMIT)] = None,
) -> Response:
    """As `POST /api/v1/webhook-endpoints`; the answer shows the signing secret, once."""
    principal = signed_in.principal
    principal.require_scope(Scope.WEBHOOKS_WRITE)
    try:
        payload = _validated(
            EndpointCreate,
            {
                "url": url,
                "description": description,
                "event_types": [p for p in _PATTERN_SEPARATORS.split(event_types) if p],
                "organisation_id": organisation_id.strip() or None,
                "ordered": ordered,
                "rate_limit": rate_limit,
            },
        )
        created = await service.create_endpoint(
            session, principal, payload, policy=_policy(request), box=_box(request)
        )
    except MemberhubError as exc:
        await session.rollback()
        typed = {
            "url": url,
            "event_types": event_types,
            "description": description,
            "organisation_id": organisation_id,
            "rate_limit": "" if rate_limit is None else str(rate_limit),
            "ordered": ordered,
        }
        return await _list_page(
            request, session, principal, error=exc.message, form=typed, status_code=exc.status_code
        )
    return _shown_secret(request, created, rotated=False)


@router.get("/{endpoint_id}")
async def endpoint_page(
    request: Request,
    endpoint_id: IdPath,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    cursor: Cursor = None,
    status: DeliveryStatusFilter = None,
) -> Response:
    """As `GET /api/v1/webhook-endpoints/{id}` and its `deliveries`, newest first."""
    principal = signed_in.principal
    principal.require_scope(Scope.WEBHOOKS_READ)
    endpoint = await service.get_endpoint(session, principal, endpoint_id)
    organisations = await service.organisation_public_ids(session, [endpoint])
    deliveries = await service.list_deliveries(
        session,
        endpoint_id=endpoint.id,
        status=status,
        after_id=cursor_after_id(cursor),
        limit=DELIVERIES_PER_PAGE,
    )
    return render(
        request,
        "webhook.html",
        {
            "title": f"Webhook endpoint {endpoint.public_id}",
            "endpoint": service.to_out(endpoint, organisations.get(endpoint.organisation_id or 0)),
            "deliveries": deliveries.data,
            "next_cursor": deliveries.pagination.next_cursor,
            "status": status,
            "statuses": DeliveryStatus.ALL,
            "can_write": Scope.WEBHOOKS_WRITE in principal.scopes,
        },
    )


async def _update(
    request: Request,
    session: ConsoleDb,
    principal: Principal,
    endpoint_id: str,
    patch: EndpointPatch,
) -> None:
    await service.update_endpoint(session, principal, endpoint_id, patch, policy=_policy(request))


@router.post("/{endpoint_id}/enable")
async def enable(
    request: Request, endpoint_id: IdPath, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    """As `PATCH …/{id}` with `{"enabled": true}`."""
    principal = signed_in.principal
    principal.require_scope(Scope.WEBHOOKS_WRITE)
    await _update(request, session, principal, endpoint_id, EndpointPatch(enabled=True))
    console_session(request).flash("The endpoint is enabled.")
    return redirect(_endpoint_page(endpoint_id))


@router.post("/{endpoint_id}/disable")
async def disable(
    request: Request,
    endpoint_id: IdPath,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """As `PATCH …/{id}` with `{"enabled": false, "disabled_reason": …}`."""
    principal = signed_in.principal
    principal.require_scope(Scope.WEBHOOKS_WRITE)
    fields = {"enabled": False, "disabled_reason": reason.strip() or "Disabled in the console."}
    await _update(request, session, principal, endpoint_id, _validated(EndpointPatch, fields))
    console_session(request).flash("The endpoint is disabled.")
    return redirect(_endpoint_page(endpoint_id))


@router.post("/{endpoint_id}/rotate-secret")
async def rotate_secret(
    request: Request, endpoint_id: IdPath, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    """As `POST …/{id}/rotate-secret`; the answer shows the new secret, once."""
    principal = signed_in.principal
    principal.require_scope(Scope.WEBHOOKS_WRITE)
    rotated = await service.rotate_secret(session, principal, endpoint_id, box=_box(request))
    return _shown_secret(request, rotated, rotated=True)


@router.post("/{endpoint_id}/test")
async def send_test(
    request: Request,
    endpoint_id: IdPath,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    message: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """As `POST …/{id}/test`."""
    principal = signed_in.principal
    principal.require_scope(Scope.WEBHOOKS_WRITE)
    test = _validated(TestRequest, {"message": message} if message.strip() else {})
    event = await service.send_test(session, principal, endpoint_id, test.message)
    console_session(request).flash(
        f"Test event {event.public_id} sent; its delivery appears below once the worker has it."
    )
    return redirect(_endpoint_page(endpoint_id))


@router.post("/{endpoint_id}/recover")
async def recover(
    request: Request,
    endpoint_id: IdPath,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    since: Annotated[str, Form(max_length=64)],
    until: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """As `POST …/{id}/recover`: the failed deliveries created in [since, until), times in
    UTC (a time without a zone is UTC, as in the API)."""
    principal = signed_in.principal
    principal.require_scope(Scope.WEBHOOKS_WRITE)
    window = _validated(RecoverRequest, {"since": since.strip(), "until": until.strip() or None})
    count = await service.recover(
        session,
        principal,
        endpoint_id,
        since=window.since,
        until=window.until,
        schedule_length=_schedule_length(request),
    )
    console_session(request).flash(
        f"{count} failed {'delivery' if count == 1 else 'deliveries'} queued for one more attempt."
    )
    return redirect(_endpoint_page(endpoint_id))


# ---------------------------------------------------------------- deliveries


@router.post("/deliveries/{delivery_id}/retry")
async def retry_delivery(
    request: Request, delivery_id: IdPath, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    """As `POST /api/v1/deliveries/{id}/retry`: one more attempt, now."""
    principal = signed_in.principal
    principal.require_scope(Scope.WEBHOOKS_WRITE)
    delivery = await service.retry_delivery(
        session, principal, delivery_id, schedule_length=_schedule_length(request)
    )
    out = await service.delivery_out(session, delivery)
    console_session(request).flash(f"Delivery {out.id} queued for one more attempt.")
    return redirect(_endpoint_page(out.endpoint_id))
