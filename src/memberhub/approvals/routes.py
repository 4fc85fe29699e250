from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query

from memberhub.approvals import service
from memberhub.approvals.models import ApprovalStatus
from memberhub.approvals.schemas import ApprovalOut, Decision
from memberhub.auth.dependencies import ApprovalsDecider, ApprovalsReader
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath

router = APIRouter(
    prefix="/api/v1/approvals",
    tags=["approvals"],
    route_class=UnitOfWorkRoute,
    responses=ERROR_RESPONSES,
)
StatusFilter = Annotated[str | None, Query(pattern="^(" + "|".join(ApprovalStatus.ALL) + ")$")]


@router.get("")
async def list_approvals(
    session: DbSession,
    principal: ApprovalsReader,
    page: Annotated[PageParams, Depends(page_params)],
    status: StatusFilter = None,
) -> Page[ApprovalOut]:
    """Approval requests (held deductions and the like), newest first."""
    rows = await service.list_approvals(
        session, principal, status=status, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=await service.to_out_many(session, items), pagination=pagination)


@router.get("/{approval_id}")
async def get_approval(
    approval_id: IdPath, session: DbSession, principal: ApprovalsReader
) -> ApprovalOut:
    """One approval request and its decision, if any."""
    approval, _member = await service.get_approval(session, principal, approval_id)
    return await service.to_out(session, approval)


@router.post("/{approval_id}/approve")
async def approve(
    approval_id: IdPath,
    session: DbSession,
    principal: ApprovalsDecider,
    payload: Annotated[Decision | None, Body()] = None,
) -> ApprovalOut:
    """Apply the held operation (409 INSUFFICIENT_POINTS leaves it pending); the body, with
    its `note`, is optional."""
    note = payload.note if payload is not None else None
    approval = await service.approve(session, principal, approval_id, note)
    return await service.to_out(session, approval)


@router.post("/{approval_id}/reject")
async def reject(
    approval_id: IdPath,
    session: DbSession,
    principal: ApprovalsDecider,
    payload: Annotated[Decision | None, Body()] = None,
) -> ApprovalOut:
    """Reject a pending request: nothing is applied; emits the decision. The body, with its
    `note`, is optional."""
    note = payload.note if payload is not None else None
    approval = await service.reject(session, principal, approval_id, note)
    return await service.to_out(session, approval)
