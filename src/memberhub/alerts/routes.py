from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query

from memberhub.alerts import service
from memberhub.alerts.models import AlertStatus, AlertType
from memberhub.alerts.repository import AlertFilters
from memberhub.alerts.schemas import AcknowledgeRequest, AlertOut
from memberhub.auth.dependencies import AlertsReader, AlertsWriter
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath
from memberhub.members.service import get_member

router = APIRouter(
    prefix="/api/v1/alerts",
    tags=["alerts"],
    route_class=UnitOfWorkRoute,
    responses=ERROR_RESPONSES,
)


def _one_of(values: tuple[str, ...]) -> str:
    return "^(" + "|".join(values) + ")$"


TypeFilter = Annotated[str | None, Query(pattern=_one_of(AlertType.ALL))]
StatusFilter = Annotated[
    str | None, Query(pattern=_one_of((AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED)))
]
PriorityFilter = Annotated[str | None, Query(pattern=_one_of(("low", "medium", "high")))]
MemberFilter = Annotated[str | None, Query(pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$", max_length=45)]


@router.get("")
async def list_alerts(
    session: DbSession,
    principal: AlertsReader,
    page: Annotated[PageParams, Depends(page_params)],
    type: TypeFilter = None,
    status: StatusFilter = None,
    priority: PriorityFilter = None,
    member_id: MemberFilter = None,
) -> Page[AlertOut]:
    """Alerts, newest first. A key bound to an organisation sees the alerts of its members
    only; system-wide alerts (rates, no member) are listed for keys without organisation."""
    member = await get_member(session, principal, member_id) if member_id else None
    filters = AlertFilters(
        organisation_ids=principal.visible_organisation_ids,
        type=type,
        status=status,
        priority=priority,
        member_id=member.id if member is not None else None,
    )
    rows = await service.list_alerts(session, filters, after_id=page.after_id, limit=page.limit)
    items, pagination = build_page([alert for alert, _ in rows], page.limit)
    members = {alert.id: member_public_id for alert, member_public_id in rows}
    return Page(
        data=service.to_out_many([(alert, members[alert.id]) for alert in items]),
        pagination=pagination,
    )


@router.get("/{alert_id}")
async def get_alert(alert_id: IdPath, session: DbSession, principal: AlertsReader) -> AlertOut:
    """One alert."""
    alert, member = await service.get_alert(session, principal, alert_id)
    return service.to_out(alert, member.public_id if member is not None else None)


@router.post("/{alert_id}/acknowledge")
async def acknowledge(
    alert_id: IdPath,
    session: DbSession,
    principal: AlertsWriter,
    payload: Annotated[AcknowledgeRequest | None, Body()] = None,
) -> AlertOut:
    """Mark the alert as seen, with an optional note; 409 ALERT_ALREADY_ACKNOWLEDGED when
    someone already did."""
    note = payload.note if payload is not None else None
    alert, member = await service.acknowledge(session, principal, alert_id, note)
    return service.to_out(alert, member.public_id if member is not None else None)
