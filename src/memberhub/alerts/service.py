"""Alerts: raised by the ledger and the scheduled checks, listed and acknowledged by staff."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.alerts.models import Alert, AlertStatus, AlertType
from memberhub.alerts.repository import AlertFilters, AlertRepository
from memberhub.alerts.schemas import AlertOut
from memberhub.audit.service import record_write
from memberhub.auth.principal import Principal
from memberhub.events.catalog import AlertRaised
from memberhub.events.service import emit
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, NotFound
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member

PRIORITIES = {
    AlertType.POINTS_EXPIRING: "medium",
    AlertType.LARGE_REDEMPTION: "low",
    AlertType.NEGATIVE_BALANCE: "high",
    AlertType.HIGH_EXPIRATION_RATE: "medium",
    AlertType.LOW_REDEMPTION_RATE: "low",
    AlertType.WEBHOOK_ENDPOINT_DISABLED: "high",
    AlertType.PAYMENT_FAILED: "high",
    AlertType.INTEGRATION_INCIDENT: "high",
}


async def raise_alert(
    session: AsyncSession,
    alert_type: str,
    *,
    member: Member | None,
    dedupe_key: str,
    message: str,
    now: datetime,
    points: int | None = None,
    data: dict[str, Any] | None = None,
) -> Alert | None:
    """Raise an alert once per `dedupe_key` (a repeat returns None), with `alert.raised`."""
    existing = await session.scalar(select(Alert.id).where(Alert.dedupe_key == dedupe_key))
    if existing is not None:
        return None
    alert = Alert(
        public_id=new_public_id("alr"),
        type=alert_type,
        priority=PRIORITIES[alert_type],
        status=AlertStatus.OPEN,
        member_id=member.id if member is not None else None,
        message=message,
        data=data or {},
        dedupe_key=dedupe_key,
        points=points,
        raised_at=now,
    )
    session.add(alert)
    await session.flush()
    emit(
        session,
        AlertRaised(
            alert_id=alert.public_id,
            alert_type=alert_type,
            priority=alert.priority,
            member_id=member.public_id if member is not None else None,
            message=message,
            data=alert.data,
            occurred_at=now,
        ),
        organisation_id=member.organisation_id if member is not None else None,
        member_public_id=member.public_id if member is not None else None,
        occurred_at=now,
    )
    return alert


# ---------------------------------------------------------------- reading and acknowledging


class AlertAlreadyAcknowledged(Conflict):
    code = "ALERT_ALREADY_ACKNOWLEDGED"
    default_message = "The alert was already acknowledged."


def can_see(principal: Principal, alert: Alert, member: Member | None) -> bool:
    """A key bound to an organisation sees the alerts of its members; system-wide alerts
    (no member) concern the whole installation and are only for keys without one."""
    if principal.visible_organisation_ids is None:
        return True
    return member is not None and principal.can_see_organisation(member.organisation_id)


async def get_alert(
    session: AsyncSession, principal: Principal, public_id: str, *, for_update: bool = False
) -> tuple[Alert, Member | None]:
    alert = await AlertRepository(session).get_by_public_id(public_id, for_update=for_update)
    member = (
        await session.get(Member, alert.member_id)
        if alert is not None and alert.member_id is not None
        else None
    )
    if alert is None or not can_see(principal, alert, member):
        raise NotFound(f"Alert {public_id} does not exist.", code="ALERT_NOT_FOUND")
    return alert, member


async def list_alerts(
    session: AsyncSession, filters: AlertFilters, *, after_id: int | None, limit: int
) -> list[tuple[Alert, str | None]]:
    rows = await AlertRepository(session).list(filters, after_id=after_id, limit=limit)
    return [(alert, member_public_id) for alert, member_public_id in rows]


async def acknowledge(
    session: AsyncSession, principal: Principal, public_id: str, note: str | None
) -> tuple[Alert, Member | None]:
    """Mark an open alert as seen, once: a second acknowledgement is a 409."""
    alert, member = await get_alert(session, principal, public_id, for_update=True)
    if alert.status == AlertStatus.ACKNOWLEDGED:
        raise AlertAlreadyAcknowledged(
            f"Alert {public_id} was already acknowledged.",
            details={
                "acknowledged_at": alert.acknowledged_at.isoformat()
                if alert.acknowledged_at
                else None,
                "acknowledged_by": alert.acknowledged_by,
            },
        )
    alert.status = AlertStatus.ACKNOWLEDGED
    alert.acknowledged_at = utcnow()
    alert.acknowledged_by = principal.actor.id
    alert.note = note
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="alert.acknowledge",
        object_type="alert",
        object_id=alert.public_id,
        changes={
            "status": {"before": AlertStatus.OPEN, "after": AlertStatus.ACKNOWLEDGED},
            "note": note,
        },
    )
    return alert, member


def to_out(alert: Alert, member_public_id: str | None) -> AlertOut:
    return AlertOut(
        id=alert.public_id,
        type=alert.type,
        priority=alert.priority,
        status=alert.status,
        member_id=member_public_id,
        message=alert.message,
        data=dict(alert.data),
        points=alert.points,
        raised_at=alert.raised_at,
        acknowledged_at=alert.acknowledged_at,
        acknowledged_by=alert.acknowledged_by,
        note=alert.note,
    )


def to_out_many(rows: Sequence[tuple[Alert, str | None]]) -> list[AlertOut]:
    return [to_out(alert, member_public_id) for alert, member_public_id in rows]
