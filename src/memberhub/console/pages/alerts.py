"""Alerts: open and acknowledged alerts with filters, one alert's detail, and the
acknowledge form. The same service functions and checks as `/api/v1/alerts`: an
organisation-bound user sees the alerts of their organisations' members only, never the
system-wide ones, and acknowledging needs `alerts:write`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from starlette.responses import Response

from memberhub.alerts import service
from memberhub.alerts.models import AlertStatus, AlertType
from memberhub.alerts.repository import AlertFilters
from memberhub.auth.roles import Scope
from memberhub.console.session import console_session
from memberhub.console.web import ConsoleDb, ConsoleRoute, SignedInStaff, redirect, render
from memberhub.kit.pagination import build_page, cursor_after_id
from memberhub.kit.types import IdPath, LongText

router = APIRouter(prefix="/console/alerts", route_class=ConsoleRoute, include_in_schema=False)
PAGE_SIZE = 50
STATUSES = (AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED, "all")
PRIORITIES = ("low", "medium", "high")


def _one_of(values: tuple[str, ...]) -> str:
    return "^(" + "|".join(values) + ")$"


StatusFilter = Annotated[str, Query(pattern=_one_of(STATUSES))]
# An empty choice in the filter form means "any".
TypeFilter = Annotated[str | None, Query(pattern=_one_of(("", *AlertType.ALL)))]
PriorityFilter = Annotated[str | None, Query(pattern=_one_of(("", *PRIORITIES)))]
Cursor = Annotated[str | None, Query(max_length=512)]


@router.get("")
async def list_alerts(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    status: StatusFilter = AlertStatus.OPEN,
    type: TypeFilter = None,
    priority: PriorityFilter = None,
    cursor: Cursor = None,
) -> Response:
    principal = signed_in.principal
    principal.require_scope(Scope.ALERTS_READ)
    filters = AlertFilters(
        organisation_ids=principal.visible_organisation_ids,
        type=type or None,
        status=None if status == "all" else status,
        priority=priority or None,
    )
    rows = await service.list_alerts(
        session, filters, after_id=cursor_after_id(cursor), limit=PAGE_SIZE
    )
    items, pagination = build_page([alert for alert, _ in rows], PAGE_SIZE)
    members = {alert.id: member_public_id for alert, member_public_id in rows}
    return render(
        request,
        "alerts.html",
        {
            "title": "Alerts",
            "alerts": service.to_out_many([(alert, members[alert.id]) for alert in items]),
            "status": status,
            "type": type or "",
            "priority": priority or "",
            "statuses": STATUSES,
            "types": AlertType.ALL,
            "priorities": PRIORITIES,
            "next_cursor": pagination.next_cursor,
            "can_acknowledge": Scope.ALERTS_WRITE in principal.scopes,
        },
    )


@router.get("/{alert_id}")
async def detail(
    request: Request, alert_id: IdPath, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    principal = signed_in.principal
    principal.require_scope(Scope.ALERTS_READ)
    alert, member = await service.get_alert(session, principal, alert_id)
    return render(
        request,
        "alert.html",
        {
            "title": f"Alert {alert.public_id}",
            "alert": service.to_out(alert, member.public_id if member is not None else None),
            "can_acknowledge": Scope.ALERTS_WRITE in principal.scopes,
        },
    )


@router.post("/{alert_id}/acknowledge")
async def acknowledge(
    request: Request,
    alert_id: IdPath,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    note: Annotated[LongText | None, Form()] = None,
) -> Response:
    """As `POST /api/v1/alerts/{id}/acknowledge`; a second acknowledgement is a 409."""
    principal = signed_in.principal
    principal.require_scope(Scope.ALERTS_WRITE)
    note = (note or "").strip() or None
    alert, _member = await service.acknowledge(session, principal, alert_id, note)
    console_session(request).flash(f"Alert {alert.public_id} acknowledged.")
    return redirect(f"/console/alerts/{alert.public_id}")
