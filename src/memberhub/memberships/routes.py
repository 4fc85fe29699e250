from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth.dependencies import (
    MembershipsReader,
    MembershipsWriter,
    PlansReader,
    PlansWriter,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath
from memberhub.members.models import Member
from memberhub.members.service import get_member
from memberhub.members.service import to_out as member_out
from memberhub.memberships import service
from memberhub.memberships.models import MembershipTerm
from memberhub.memberships.repository import (
    PlanRepository,
    StatusHistoryRepository,
    TermRepository,
)
from memberhub.memberships.schemas import (
    CancelRequest,
    JoinRequest,
    MembershipResult,
    PlanCreate,
    PlanOut,
    PlanPatch,
    RenewRequest,
    StatusChangeOut,
    StatusNote,
    TermOut,
    UpgradeRequest,
)

router = APIRouter(
    prefix="/api/v1", tags=["memberships"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)


@router.post("/plans", status_code=status.HTTP_201_CREATED, tags=["plans"])
async def create_plan(
    payload: PlanCreate, session: DbSession, principal: PlansWriter, response: Response
) -> PlanOut:
    """Create a membership plan: price, currency, term, grace and renewal settings."""
    plan = await service.create_plan(session, principal, payload)
    response.headers["Location"] = f"/api/v1/plans/{plan.public_id}"
    return (await service.plans_to_out(session, [plan]))[0]


@router.get("/plans", tags=["plans"])
async def list_plans(
    session: DbSession,
    principal: PlansReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[PlanOut]:
    """Membership plans, oldest first."""
    rows = await PlanRepository(session).list(
        visible_ids=principal.visible_organisation_ids, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=await service.plans_to_out(session, items), pagination=pagination)


@router.get("/plans/{plan_id}", tags=["plans"])
async def get_plan(plan_id: IdPath, session: DbSession, principal: PlansReader) -> PlanOut:
    """One membership plan."""
    plan = await service.get_plan(session, principal, plan_id)
    return (await service.plans_to_out(session, [plan]))[0]


@router.patch("/plans/{plan_id}", tags=["plans"])
async def update_plan(
    plan_id: IdPath, payload: PlanPatch, session: DbSession, principal: PlansWriter
) -> PlanOut:
    """Change a plan's name, price, currency, grace, renewal window, auto-renewal or
    whether new members may join it."""
    plan = await service.update_plan(session, principal, plan_id, payload)
    return (await service.plans_to_out(session, [plan]))[0]


async def _result(
    session: AsyncSession, member: Member, term: MembershipTerm | None = None
) -> MembershipResult:
    if term is None:
        term = await TermRepository(session).current(member.id, utcnow())
    term_out = None
    if term is not None:
        plans = await TermRepository(session).plan_public_ids({term.plan_id})
        term_out = service.term_to_out(term, plans[term.plan_id])
    return MembershipResult(member=member_out(member), term=term_out)


@router.post("/members/{member_id}/membership/join")
async def join(
    member_id: IdPath, payload: JoinRequest, session: DbSession, principal: MembershipsWriter
) -> MembershipResult:
    """Start a first (or new, after lapse or cancellation) membership term from now."""
    member, term = await service.join(session, principal, member_id, payload.plan_id, payload.note)
    return await _result(session, member, term)


@router.post("/members/{member_id}/membership/renew")
async def renew(
    member_id: IdPath, payload: RenewRequest, session: DbSession, principal: MembershipsWriter
) -> MembershipResult:
    """Add a term. Inside the renewal window or grace period it starts where the previous
    term ends; a lapsed member's new term starts now."""
    member, term = await service.renew(session, principal, member_id, payload.plan_id, payload.note)
    return await _result(session, member, term)


@router.post("/members/{member_id}/membership/upgrade")
async def upgrade(
    member_id: IdPath, payload: UpgradeRequest, session: DbSession, principal: MembershipsWriter
) -> MembershipResult:
    """Move to another plan now: the current term ends early and a new one starts."""
    member, term = await service.upgrade(
        session, principal, member_id, payload.plan_id, payload.note
    )
    return await _result(session, member, term)


@router.post("/members/{member_id}/membership/lapse")
async def lapse(
    member_id: IdPath, payload: StatusNote, session: DbSession, principal: MembershipsWriter
) -> MembershipResult:
    """End the membership now (status `lapsed`), with an optional note."""
    member, term = await service.lapse(session, principal, member_id, payload.note)
    return await _result(session, member, term)


@router.post("/members/{member_id}/membership/cancel")
async def cancel(
    member_id: IdPath, payload: CancelRequest, session: DbSession, principal: MembershipsWriter
) -> MembershipResult:
    """Cancel the membership, now or (`at_period_end`) when the paid term ends."""
    member, term = await service.cancel(
        session, principal, member_id, at_period_end=payload.at_period_end, note=payload.note
    )
    return await _result(session, member, term)


@router.post("/members/{member_id}/membership/suspend")
async def suspend(
    member_id: IdPath, payload: StatusNote, session: DbSession, principal: MembershipsWriter
) -> MembershipResult:
    """Suspend the membership (status `suspended`) until it is reinstated."""
    member = await service.suspend(session, principal, member_id, payload.note)
    return await _result(session, member)


@router.post("/members/{member_id}/membership/reinstate")
async def reinstate(
    member_id: IdPath, payload: StatusNote, session: DbSession, principal: MembershipsWriter
) -> MembershipResult:
    """Lift a suspension: the member returns to the status the term gives."""
    member = await service.reinstate(session, principal, member_id, payload.note)
    return await _result(session, member)


@router.get("/members/{member_id}/membership/terms")
async def list_terms(
    member_id: IdPath,
    session: DbSession,
    principal: MembershipsReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[TermOut]:
    """The member's membership terms, newest first."""
    member = await get_member(session, principal, member_id)
    repo = TermRepository(session)
    rows = await repo.for_member(member.id, after_id=page.after_id, limit=page.limit)
    items, pagination = build_page(rows, page.limit)
    plans = await repo.plan_public_ids({t.plan_id for t in items})
    return Page(
        data=[service.term_to_out(t, plans[t.plan_id]) for t in items], pagination=pagination
    )


@router.get("/members/{member_id}/status-history")
async def status_history(
    member_id: IdPath,
    session: DbSession,
    principal: MembershipsReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[StatusChangeOut]:
    """Every status change of the member, with who made it and why."""
    member = await get_member(session, principal, member_id)
    rows = await StatusHistoryRepository(session).for_member(
        member.id, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(
        data=[StatusChangeOut.model_validate(c, from_attributes=True) for c in items],
        pagination=pagination,
    )
