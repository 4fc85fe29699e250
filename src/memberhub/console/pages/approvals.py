"""Approvals: the queue of held deductions, one request's detail, and the approve and
reject forms. The same service functions and checks as `/api/v1/approvals`: the role needs
`approvals:decide` to decide, nobody decides their own request, and an organisation-bound
user sees and decides only requests for members of their organisations."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from starlette.responses import Response

from memberhub.approvals import service
from memberhub.approvals.models import ApprovalStatus
from memberhub.auth.principal import Principal
from memberhub.auth.roles import Scope
from memberhub.console.session import console_session
from memberhub.console.web import ConsoleDb, ConsoleRoute, SignedInStaff, redirect, render
from memberhub.kit.errors import MemberhubError
from memberhub.kit.pagination import build_page, cursor_after_id
from memberhub.kit.types import IdPath, LongText
from memberhub.points.repository import PointsRepository

router = APIRouter(prefix="/console/approvals", route_class=ConsoleRoute, include_in_schema=False)
PAGE_SIZE = 50
StatusFilter = Annotated[str, Query(pattern="^(" + "|".join((*ApprovalStatus.ALL, "all")) + ")$")]
Cursor = Annotated[str | None, Query(max_length=512)]
Note = Annotated[LongText | None, Form()]


def _note(note: str | None) -> str | None:
    return (note or "").strip() or None


@router.get("")
async def queue(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    status: StatusFilter = ApprovalStatus.PENDING,
    cursor: Cursor = None,
) -> Response:
    principal = signed_in.principal
    principal.require_scope(Scope.APPROVALS_READ)
    rows = await service.list_approvals(
        session,
        principal,
        status=None if status == "all" else status,
        after_id=cursor_after_id(cursor),
        limit=PAGE_SIZE,
    )
    items, pagination = build_page(rows, PAGE_SIZE)
    return render(
        request,
        "approvals.html",
        {
            "title": "Approvals",
            "status": status,
            "statuses": (*ApprovalStatus.ALL, "all"),
            "approvals": await service.to_out_many(session, items),
            "next_cursor": pagination.next_cursor,
            "can_decide": Scope.APPROVALS_DECIDE in principal.scopes,
        },
    )


async def _detail(
    request: Request,
    session: ConsoleDb,
    principal: Principal,
    approval_id: str,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    approval, member = await service.get_approval(session, principal, approval_id)
    balance = None
    if Scope.POINTS_READ in principal.scopes:
        account = await PointsRepository(session).get_account(member.id)
        balance = account.current if account is not None else 0
    return render(
        request,
        "approval.html",
        {
            "title": f"Approval {approval.public_id}",
            "approval": await service.to_out(session, approval),
            "can_decide": Scope.APPROVALS_DECIDE in principal.scopes,
            "own_request": approval.requested_by == principal.actor.id,
            "balance": balance,
            "error": error,
        },
        status_code=status_code,
    )


@router.get("/{approval_id}")
async def detail(
    request: Request, approval_id: IdPath, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    signed_in.principal.require_scope(Scope.APPROVALS_READ)
    return await _detail(request, session, signed_in.principal, approval_id)


@router.post("/{approval_id}/approve")
async def approve(
    request: Request,
    approval_id: IdPath,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    note: Note = None,
) -> Response:
    """As `POST /api/v1/approvals/{id}/approve`: the held deduction is applied, recorded as
    the signed-in staff user."""
    principal = signed_in.principal
    principal.require_scope(Scope.APPROVALS_DECIDE)
    try:
        approval = await service.approve(session, principal, approval_id, _note(note))
    except MemberhubError as exc:
        # Nothing of a refused decision is kept; the page says why, with the request as it is.
        await session.rollback()
        return await _detail(
            request,
            session,
            principal,
            approval_id,
            error=exc.message,
            status_code=exc.status_code,
        )
    console_session(request).flash(
        f"Approved {approval.public_id}: {approval.points} points deducted."
    )
    return redirect(f"/console/approvals/{approval.public_id}")


@router.post("/{approval_id}/reject")
async def reject(
    request: Request,
    approval_id: IdPath,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    note: Note = None,
) -> Response:
    """As `POST /api/v1/approvals/{id}/reject`: nothing is applied; the note is kept."""
    principal = signed_in.principal
    principal.require_scope(Scope.APPROVALS_DECIDE)
    try:
        approval = await service.reject(session, principal, approval_id, _note(note))
    except MemberhubError as exc:
        await session.rollback()
        return await _detail(
            request,
            session,
            principal,
            approval_id,
            error=exc.message,
            status_code=exc.status_code,
        )
    console_session(request).flash(f"Rejected {approval.public_id}; nothing was deducted.")
    return redirect(f"/console/approvals/{approval.public_id}")
