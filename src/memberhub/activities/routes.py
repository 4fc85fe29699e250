from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.activities import service
from memberhub.activities.models import ActivityStatus
from memberhub.activities.repository import ActivityFilters, ActivityRepository
from memberhub.activities.schemas import (
    ActivityIn,
    ActivityOut,
    ActivityResult,
    MatchRequest,
)
from memberhub.auth.dependencies import ActivitiesReader, ActivitiesWriter
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath, SafeQuery, UTCDatetime
from memberhub.leads.service import get_lead
from memberhub.members.service import get_member

router = APIRouter(
    prefix="/api/v1", tags=["activities"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)
StatusFilter = Annotated[
    str | None,
    Query(
        pattern="^(" + "|".join(ActivityStatus.ALL) + ")$",
        description="`unmatched`: activities waiting for a member with their key.",
    ),
]
RECORDED_OR_REPLAYED: dict[int | str, dict[str, Any]] = {
    200: {"model": ActivityResult, "description": "A replay of the source id: the first one"}
}


@router.post("/activities", status_code=status.HTTP_201_CREATED, responses=RECORDED_OR_REPLAYED)
async def record_activity(
    payload: ActivityIn, response: Response, session: DbSession, principal: ActivitiesWriter
) -> ActivityResult:
    """Record something a member did. The member is `member_id`, or the member the
    `external_id`, then the `email`, fits in the activity's organisation; otherwise the
    activity is kept unmatched until such a member is created. For a matched activity the
    earning rules are evaluated at once and their credits listed (`credits`); emits
    `activity.recorded`. A repeat of `source` + `source_id` in the organisation returns
    the first activity with 200 and credits nothing again."""
    recorded = await service.record_activity(session, principal, payload)
    if recorded.replayed:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/api/v1/activities/{recorded.activity.id}"
    return ActivityResult(activity=recorded.activity, replayed=recorded.replayed)


async def _page(
    session: AsyncSession, filters: ActivityFilters, page: PageParams
) -> Page[ActivityOut]:
    rows = await ActivityRepository(session).list_activities(
        filters, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=await service.activities_out(session, items), pagination=pagination)


@router.get("/activities")
async def list_activities(
    session: DbSession,
    principal: ActivitiesReader,
    page: Annotated[PageParams, Depends(page_params)],
    member_id: Annotated[str | None, Query(pattern=r"^mem_[0-9a-z]{1,40}$")] = None,
    status: StatusFilter = None,
    lead_id: Annotated[
        str | None,
        Query(pattern=r"^led_[0-9a-z]{1,40}$", description="Those that made or found this lead."),
    ] = None,
    type: SafeQuery = None,
    source: SafeQuery = None,
    date_from: UTCDatetime | None = None,
    date_to: UTCDatetime | None = None,
) -> Page[ActivityOut]:
    """Activities, newest first, of the organisations (and members) the key can see;
    `date_from`/`date_to` bound when they occurred."""
    member = await get_member(session, principal, member_id) if member_id else None
    lead = await get_lead(session, principal, lead_id) if lead_id else None
    filters = ActivityFilters(
        member_id=member.id if member is not None else None,
        organisation_ids=principal.visible_organisation_ids,
        matched=None if status is None else status == ActivityStatus.MATCHED,
        lead_id=lead.id if lead is not None else None,
        type=type,
        source=source,
        date_from=date_from,
        date_to=date_to,
    )
    return await _page(session, filters, page)


@router.get("/activities/{activity_id}")
async def get_activity(
    activity_id: IdPath, session: DbSession, principal: ActivitiesReader
) -> ActivityOut:
    """One activity, with what the earning rules did for it."""
    listed = await service.get_activity(session, principal, activity_id)
    return (await service.activities_out(session, [listed]))[0]


@router.post("/activities/{activity_id}/match")
async def match_activity(
    activity_id: IdPath, payload: MatchRequest, session: DbSession, principal: ActivitiesWriter
) -> ActivityOut:
    """Match an unmatched activity to the member named, or by its key again, and evaluate
    the earning rules for it; emits `activity.matched`. 409 ACTIVITY_ALREADY_MATCHED, or
    NO_MATCHING_MEMBER when its key still fits no single member."""
    return await service.match_activity(
        session, principal, activity_id, member_public_id=payload.member_id
    )


@router.get("/members/{member_id}/activities")
async def member_activities(
    member_id: IdPath,
    session: DbSession,
    principal: ActivitiesReader,
    page: Annotated[PageParams, Depends(page_params)],
    type: SafeQuery = None,
    source: SafeQuery = None,
    date_from: UTCDatetime | None = None,
    date_to: UTCDatetime | None = None,
) -> Page[ActivityOut]:
    """The member's activity history, newest first."""
    member = await get_member(session, principal, member_id)
    filters = ActivityFilters(
        member_id=member.id, type=type, source=source, date_from=date_from, date_to=date_to
    )
    return await _page(session, filters, page)
