from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from memberhub.analytics import service
from memberhub.analytics.schemas import Kpis, KpisSeries, MemberClv
from memberhub.auth.dependencies import AnalyticsReader
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import ValidationFailed
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.types import IdPath, UTCDatetime
from memberhub.members.service import get_member

router = APIRouter(
    prefix="/api/v1", tags=["analytics"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)
# The ledger cannot hold anything earlier; it also keeps `as_of - 30 days` representable.
EARLIEST_AS_OF = datetime(1970, 1, 31, tzinfo=UTC)


@router.get("/analytics/kpis")
async def kpis(
    session: DbSession, principal: AnalyticsReader, as_of: UTCDatetime | None = None
) -> Kpis:
    """Points liability, its 30-day growth, redemption cost, redemption and expiration rates,
    active points users and average balance, at `as_of` (default now). A key bound to an
    organisation gets the figures of its members only."""
    now = utcnow()
    if as_of is not None and as_of > now:
        raise ValidationFailed(
            "as_of must be a past moment, not in the future.",
            details={"field": "as_of", "now": now.isoformat()},
        )
    if as_of is not None and as_of < EARLIEST_AS_OF:
        raise ValidationFailed(
            f"as_of must be on or after {EARLIEST_AS_OF.date().isoformat()}.",
            details={"field": "as_of", "earliest": EARLIEST_AS_OF.isoformat()},
        )
    return await service.kpis(session, principal.visible_organisation_ids, as_of=as_of, now=now)


@router.get("/analytics/kpis/series")
async def kpis_series(
    session: DbSession,
    principal: AnalyticsReader,
    months: Annotated[int, Query(ge=1, le=24, description="How many month ends.")] = 12,
) -> KpisSeries:
    """The KPIs at the end of each of the last `months` months, oldest first: each point is
    `GET /analytics/kpis?as_of=` its `as_of` (the last of the month's final microsecond),
    and the last point is now (the current month so far). For charts over time."""
    now = utcnow()
    points = await service.kpis_series(
        session,
        principal.visible_organisation_ids,
        months=months,
        now=now,
        earliest=EARLIEST_AS_OF,
    )
    return KpisSeries(months=months, points=points)


@router.get("/members/{member_id}/clv")
async def member_clv(
    member_id: IdPath,
    session: DbSession,
    principal: AnalyticsReader,
    months: Annotated[int, Query(ge=1, le=600, description="Projection horizon.")] = 36,
) -> MemberClv:
    """Customer lifetime value from the member's purchases (earn transactions)."""
    member = await get_member(session, principal, member_id)
    return await service.member_clv(session, member, months=months, now=utcnow())
