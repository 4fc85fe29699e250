"""Alerts: raised by the ledger and the scheduled checks, listed and acknowledged by staff."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.alerts.models import Alert, AlertStatus, AlertType
from memberhub.events.catalog import AlertRaised
from memberhub.events.service import emit
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member

PRIORITIES = {
    AlertType.POINTS_EXPIRING: "medium",
    AlertType.LARGE_REDEMPTION: "low",
    AlertType.NEGATIVE_BALANCE: "high",
    AlertType.HIGH_EXPIRATION_RATE: "medium",
    AlertType.LOW_REDEMPTION_RATE: "low",
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
