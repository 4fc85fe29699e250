"""Members: a lookup by email, and a member's balance and latest transactions with an
"award bonus points" form. The full members page (search, widget, quick actions) builds on
this one. Everything goes through the same services and the same role and organisation
checks as the API's routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Query, Request
from starlette.responses import Response

from memberhub.approvals import service as approvals
from memberhub.auth.roles import Scope
from memberhub.console.session import console_session
from memberhub.console.web import ConsoleDb, ConsoleRoute, SignedInStaff, redirect, render
from memberhub.members.repository import MemberFilters, MemberRepository
from memberhub.members.service import get_member
from memberhub.points import service as points
from memberhub.points.repository import PointsRepository, TransactionFilters
from memberhub.program import service as program_service

router = APIRouter(prefix="/console/members", route_class=ConsoleRoute, include_in_schema=False)
MemberId = Annotated[str, Path(pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$", max_length=45)]
RECENT_TRANSACTIONS = 20
LOOKUP_RESULTS = 20


@router.get("")
async def lookup(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    email: Annotated[str | None, Query(max_length=320)] = None,
) -> Response:
    principal = signed_in.principal
    principal.require_scope(Scope.MEMBERS_READ)
    found = None
    query = (email or "").strip()
    if query and query.isprintable():
        found = await MemberRepository(session).list(
            MemberFilters(email=query, organisation_ids=principal.visible_organisation_ids),
            after_id=None,
            limit=LOOKUP_RESULTS,
        )
    return render(request, "members.html", {"title": "Members", "email": query, "members": found})


@router.get("/{member_id}")
async def member_page(
    request: Request, member_id: MemberId, session: ConsoleDb, signed_in: SignedInStaff
) -> Response:
    principal = signed_in.principal
    principal.require_scope(Scope.MEMBERS_READ)
    member = await get_member(session, principal, member_id)
    repository = PointsRepository(session)
    account = await repository.get_account(member.id)
    transactions = []
    if Scope.POINTS_READ in principal.scopes:
        rows = await repository.list_transactions(
            TransactionFilters(member_id=member.id), after_id=None, limit=RECENT_TRANSACTIONS
        )
        transactions = [txn for txn, _ in rows]
    return render(
        request,
        "member.html",
        {
            "title": "Member",
            "member": member,
            "account": account,
            "transactions": transactions,
            "can_award": Scope.POINTS_AWARD in principal.scopes,
        },
    )


@router.post("/{member_id}/award")
async def award(
    request: Request,
    member_id: MemberId,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    points_awarded: Annotated[int, Form(alias="points", ge=1, le=1_000_000)],
    reason: Annotated[str, Form(min_length=1, max_length=200)],
) -> Response:
    """As `POST /api/v1/points/award`, acting as the signed-in staff user."""
    principal = signed_in.principal
    principal.require_scope(Scope.POINTS_AWARD)
    approvals.check_award_limit(
        principal, points_awarded, await program_service.get_program(session)
    )
    member, account = await points.member_and_account(session, principal, member_id)
    await points.award_points(
        session,
        principal.actor,
        member,
        points=points_awarded,
        reason=reason.strip() or "Bonus",
        account=account,
    )
    console_session(request).flash(f"Awarded {points_awarded} points.")
    return redirect(f"/console/members/{member.public_id}")
