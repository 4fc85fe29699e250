"""Members: search, a member's page (points widget, tier progress, membership, paged
transaction history) and its quick actions.

Every page calls the same services with the same role and organisation checks as the API
route it mirrors (named in each docstring): a staff user sees and changes here exactly what
an API key of their role and organisation could. A quick action redirects back to the
member's page with a message; a refused one (insufficient points, a status that does not
allow it) raises the service's error, so the page's transaction is rolled back and the
console shows the error page.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Form, Path, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from memberhub.approvals import service as approvals
from memberhub.approvals.models import ApprovalRequest
from memberhub.auth.principal import Principal
from memberhub.auth.roles import Scope
from memberhub.console.session import console_session
from memberhub.console.web import ConsoleDb, ConsoleRoute, SignedInStaff, redirect, render
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import NotFound, ValidationFailed
from memberhub.kit.money import minor_unit_digits
from memberhub.kit.pagination import build_page, cursor_after_id
from memberhub.members.models import Member, MemberStatus
from memberhub.members.repository import MemberFilters, MemberRepository
from memberhub.members.service import get_member
from memberhub.memberships import service as memberships
from memberhub.memberships.models import MembershipPlan
from memberhub.memberships.repository import (
    PlanRepository,
    StatusHistoryRepository,
    TermRepository,
)
from memberhub.points import service as points
from memberhub.points.models import BatchStatus, PointBatch, TxnType
from memberhub.points.repository import PointsRepository, TransactionFilters
from memberhub.points.schemas import MAX_POINTS, DeductRequest
from memberhub.points.summary import EXPIRING_WINDOW, points_summary
from memberhub.program import service as program_service
from memberhub.program.models import LoyaltyProgram
from memberhub.tiers import service as tiers

router = APIRouter(prefix="/console/members", route_class=ConsoleRoute, include_in_schema=False)

PUBLIC_ID = r"^[a-z]{2,4}_[0-9a-z]{1,40}$"
OPTIONAL_PUBLIC_ID = r"^([a-z]{2,4}_[0-9a-z]{1,40})?$"
NO_NUL = r"^[^\x00]*$"
MemberId = Annotated[str, Path(pattern=PUBLIC_ID, max_length=45)]
Cursor = Annotated[str | None, Query(max_length=512)]
SearchText = Annotated[str | None, Query(max_length=200, pattern=NO_NUL)]
PointsField = Annotated[int, Form(alias="points", ge=1, le=MAX_POINTS)]
ReasonField = Annotated[str, Form(min_length=1, max_length=1000, pattern=NO_NUL)]
OptionalText = Annotated[str | None, Form(max_length=1000, pattern=NO_NUL)]
FormFlag = Annotated[bool, Form()]
# A reference id each rendering of a points form carries, as `reference_id` in the API: the
# form sent twice (a double click, a reload of the post) applies once.
FormReference = Annotated[str | None, Form(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
REFERENCED_FORMS = ("award", "redeem", "deduct")

SEARCH_PAGE_SIZE = 25
HISTORY_PAGE_SIZE = 20
STATUS_PAGE_SIZE = 20
TERMS_SHOWN = 20
PLANS_OFFERED = 100
BATCHES_OFFERED = 50
# What `external_id` looks like in `GET /api/v1/members`: SYSTEM:ID.
EXTERNAL_ID = re.compile(r"[^:\x00]{1,100}:[^\x00]{1,200}")
# The last year a new expiry may fall in: one day later must still be a valid date.
LAST_EXPIRY_YEAR = 9000


# ------------------------------------------------------------------ search


@dataclass(frozen=True)
class Search:
    """The search form's fields, blank ones as None (a form sends every field)."""

    email: str | None = None
    q: str | None = None
    external_id: str | None = None
    tier: str | None = None
    status: str | None = None

    @property
    def given(self) -> bool:
        return any(
            value is not None
            for value in (self.email, self.q, self.external_id, self.tier, self.status)
        )

    def query(self, **extra: str) -> str:
        fields = {name: value for name, value in self.__dict__.items() if value is not None}
        return urlencode({**fields, **extra})


def _blank(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def _search(
    email: str | None, q: str | None, external_id: str | None, tier: str | None, status: str | None
) -> Search:
    search = Search(
        email=_blank(email),
        q=_blank(q),
        external_id=_blank(external_id),
        tier=_blank(tier),
        status=_blank(status),
    )
    if search.status is not None and search.status not in MemberStatus.ALL:
        raise ValidationFailed(
            "Unknown member status.",
            details={"field": "status", "allowed": list(MemberStatus.ALL)},
        )
    if search.external_id is not None and not EXTERNAL_ID.fullmatch(search.external_id):
        raise ValidationFailed(
            "Give an external id as SYSTEM:ID, for example hubspot:1234.",
            details={"field": "external_id"},
        )
    return search


@router.get("")
async def search_members(
    request: Request,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    email: Annotated[str | None, Query(max_length=320, pattern=NO_NUL)] = None,
    q: SearchText = None,
    external_id: Annotated[str | None, Query(max_length=300, pattern=NO_NUL)] = None,
    tier: SearchText = None,
    status: Annotated[str | None, Query(max_length=20)] = None,
    cursor: Cursor = None,
) -> Response:
    """As `GET /api/v1/members`: the members the staff user's organisation can see, oldest
    first, filtered by every field given."""
    principal = signed_in.principal
    principal.require_scope(Scope.MEMBERS_READ)
    search = _search(email, q, external_id, tier, status)
    external = None
    if search.external_id is not None:
        system, _, value = search.external_id.partition(":")
        external = (system, value)
    filters = MemberFilters(
        status=search.status,
        tier=search.tier,
        organisation_ids=principal.visible_organisation_ids,
        email=search.email,
        external_id=external,
        q=search.q,
    )
    rows = await MemberRepository(session).list(
        filters, after_id=cursor_after_id(cursor), limit=SEARCH_PAGE_SIZE
    )
    found, pagination = build_page(rows, SEARCH_PAGE_SIZE)
    next_url = (
        "/console/members?" + search.query(cursor=pagination.next_cursor)
        if pagination.next_cursor
        else None
    )
    tier_codes = (
        [(t.code, t.name) for t in (await tiers.ladder(session)).tiers]
        if Scope.TIERS_READ in principal.scopes
        else None
    )
    return render(
        request,
        "members.html",
        {
            "title": "Members",
            "search": search,
            "members": found,
            "next_url": next_url,
            "paged": cursor is not None,
            "statuses": MemberStatus.ALL,
            "tier_codes": tier_codes,
        },
    )


# ------------------------------------------------------------------ member page


def format_money(amount: int, currency: str) -> str:
    """Minor units as the currency writes them: 1234 EUR is "12.34 EUR"."""
    digits = minor_unit_digits(currency)
    whole = Decimal(amount).scaleb(-digits)
    return f"{whole:,.{digits}f} {currency}"


@dataclass(frozen=True)
class TierProgress:
    percent: int
    reached: int
    threshold: int


async def _tier_progress(
    session: AsyncSession, next_code: str | None, points_to_next: int | None
) -> TierProgress | None:
    """How far the member is towards the next tier, from the summary's distance to it."""
    if next_code is None or points_to_next is None:
        return None
    tier = (await tiers.ladder(session)).by_code(next_code)
    if tier is None or tier.threshold <= 0:
        return None
    reached = max(0, tier.threshold - points_to_next)
    return TierProgress(
        percent=min(100, reached * 100 // tier.threshold),
        reached=reached,
        threshold=tier.threshold,
    )


async def _extendable_batches(session: AsyncSession, member: Member) -> list[PointBatch]:
    """Batches `POST /api/v1/points/extend` would accept: points left and an expiry."""
    repo = PointsRepository(session)
    found: list[PointBatch] = []
    for status in (BatchStatus.ACTIVE, BatchStatus.PENDING):
        rows = await repo.batches_for_member(
            member.id, status=status, after_id=None, limit=BATCHES_OFFERED
        )
        found.extend(b for b in rows if b.remaining > 0 and b.expires_at is not None)
    return sorted(found, key=lambda b: (b.expires_at, b.id))[:BATCHES_OFFERED]


async def _offered_plans(session: AsyncSession, principal: Principal) -> list[MembershipPlan]:
    """The plans `GET /api/v1/plans` lists to this staff user that new terms may use."""
    rows = await PlanRepository(session).list(
        visible_ids=principal.visible_organisation_ids, after_id=None, limit=PLANS_OFFERED
    )
    return [plan for plan in rows if plan.active]


async def _points_section(
    session: AsyncSession, member: Member, cursor: str | None
) -> dict[str, Any]:
    """As `GET /api/v1/members/{id}/points` and `…/points/transactions`."""
    now = utcnow()
    summary = await points_summary(session, member, now)
    rows = await PointsRepository(session).list_transactions(
        TransactionFilters(member_id=member.id),
        after_id=cursor_after_id(cursor),
        limit=HISTORY_PAGE_SIZE,
    )
    items, pagination = build_page([txn for txn, _ in rows], HISTORY_PAGE_SIZE)
    history = await points.transactions_out(
        session, [(txn, member.public_id) for txn in items], with_allocations=False
    )
    expiring_by = now + EXPIRING_WINDOW
    return {
        "summary": summary,
        "balance_value": format_money(summary.balance_value, summary.currency),
        "expiring_dates": [
            item for item in summary.expiration_schedule if now < item.date <= expiring_by
        ],
        "progress": await _tier_progress(
            session,
            summary.next_tier.code if summary.next_tier else None,
            summary.points_to_next_tier,
        ),
        "transactions": history,
        "transactions_next": pagination.next_cursor,
    }


async def _membership_section(
    session: AsyncSession, member: Member, status_cursor: str | None
) -> dict[str, Any]:
    """As `GET /api/v1/members/{id}/membership/terms` and `…/status-history`."""
    term_repo = TermRepository(session)
    terms = list(await term_repo.for_member(member.id, after_id=None, limit=TERMS_SHOWN))
    terms_more = len(terms) > TERMS_SHOWN
    terms = terms[:TERMS_SHOWN]
    plan_ids = await term_repo.plan_public_ids({t.plan_id for t in terms})
    rows = await StatusHistoryRepository(session).for_member(
        member.id, after_id=cursor_after_id(status_cursor), limit=STATUS_PAGE_SIZE
    )
    changes, pagination = build_page(rows, STATUS_PAGE_SIZE)
    return {
        "terms": [memberships.term_to_out(t, plan_ids[t.plan_id]) for t in terms],
        "terms_more": terms_more,
        "status_changes": changes,
        "status_next": pagination.next_cursor,
    }


@router.get("/{member_id}")
async def member_page(
    request: Request,
    member_id: MemberId,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    cursor: Cursor = None,
    status_cursor: Cursor = None,
) -> Response:
    """As `GET /api/v1/members/{id}`, with what the points and membership routes show when
    the staff user's role may read them, and the quick actions their role may take."""
    principal = signed_in.principal
    principal.require_scope(Scope.MEMBERS_READ)
    member = await get_member(session, principal, member_id)
    scopes = principal.scopes
    context: dict[str, Any] = {
        "title": "Member",
        "member": member,
        "can_read_points": Scope.POINTS_READ in scopes,
        "can_read_membership": Scope.MEMBERSHIPS_READ in scopes,
        "can_award": Scope.POINTS_AWARD in scopes,
        "can_redeem": Scope.POINTS_EARN in scopes,
        "can_deduct": Scope.POINTS_DEDUCT in scopes,
        "can_extend": Scope.POINTS_EXTEND in scopes,
        "can_change_membership": Scope.MEMBERSHIPS_WRITE in scopes,
        "can_open_approvals": Scope.APPROVALS_READ in scopes,
        "sent_for_approval": _sent_for_approval(request, member),
        "references": {form: f"console-{secrets.token_urlsafe(16)}" for form in REFERENCED_FORMS},
        "cursor": cursor,
        "status_cursor": status_cursor,
    }
    if context["can_read_points"]:
        context.update(await _points_section(session, member, cursor))
    if context["can_read_membership"]:
        context.update(await _membership_section(session, member, status_cursor))
    base = f"/console/members/{member.public_id}"
    transactions_next = context.get("transactions_next")
    status_next = context.get("status_next")
    context["transactions_next_url"] = (
        _page_url(base, cursor=transactions_next, status_cursor=status_cursor)
        if transactions_next
        else None
    )
    context["status_next_url"] = (
        _page_url(base, cursor=cursor, status_cursor=status_next) if status_next else None
    )
    context["first_page_url"] = base if cursor or status_cursor else None
    program = await program_service.get_program(session)
    context["program_zone"] = program.timezone
    if context["can_deduct"]:
        context["deduct_limit"] = _deduct_limit(principal, program)
    if context["can_extend"]:
        context["extendable"] = await _extendable_batches(session, member)
    if context["can_change_membership"] and Scope.PLANS_READ in scopes:
        context["plans"] = await _offered_plans(session, principal)
    return render(request, "member.html", context)


def _page_url(base: str, *, cursor: str | None, status_cursor: str | None) -> str:
    """The member page showing other pages of its transaction and status lists."""
    fields = {"cursor": cursor, "status_cursor": status_cursor}
    return base + "?" + urlencode({k: v for k, v in fields.items() if v is not None})


def _deduct_limit(principal: Principal, program: LoyaltyProgram) -> int | None:
    """The most points this role deducts without an approval (None: no limit)."""
    limit: int | None = getattr(program_service.role_limits(program), str(principal.role)).deduct
    return limit


def _sent_for_approval(request: Request, member: Member) -> str | None:
    """The approval request a deduction from this page just made, to link to."""
    sent = console_session(request).take_pending("sent_for_approval")
    if sent is None or sent.get("member") != member.public_id:
        return None
    approval_id = sent.get("id")
    return approval_id if isinstance(approval_id, str) else None


def _done(request: Request, member: Member, message: str) -> Response:
    console_session(request).flash(message)
    return redirect(f"/console/members/{member.public_id}")


def _applied(result: points.LedgerResult, message: str) -> str:
    if result.replayed:
        return f"This form was already sent; nothing more was done. ({message})"
    return message


def _reason(value: str) -> str:
    reason = value.strip()
    if not reason:
        raise ValidationFailed("Give a reason.", details={"field": "reason"})
    return reason


def _note(value: str | None) -> str | None:
    return _blank(value)


# ------------------------------------------------------------------ points actions


@router.post("/{member_id}/award")
async def award(
    request: Request,
    member_id: MemberId,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    points_awarded: PointsField,
    reason: ReasonField,
    reference_id: FormReference = None,
) -> Response:
    """As `POST /api/v1/points/award`, acting as the signed-in staff user."""
    principal = signed_in.principal
    principal.require_scope(Scope.POINTS_AWARD)
    approvals.check_award_limit(
        principal, points_awarded, await program_service.get_program(session)
    )
    account = None
    if reference_id is None:
        member, account = await points.member_and_account(session, principal, member_id)
    else:
        member = await get_member(session, principal, member_id)
    result = await points.award_points(
        session,
        principal.actor,
        member,
        points=points_awarded,
        reason=_reason(reason),
        reference_id=reference_id,
        account=account,
    )
    return _done(request, member, _applied(result, f"Awarded {points_awarded} points."))


@router.post("/{member_id}/redeem")
async def redeem(
    request: Request,
    member_id: MemberId,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    points_redeemed: PointsField,
    reason: OptionalText = None,
    reference_id: FormReference = None,
) -> Response:
    """As `POST /api/v1/points/redeem`: spend points, soonest-expiring first."""
    principal = signed_in.principal
    principal.require_scope(Scope.POINTS_EARN)
    member = await get_member(session, principal, member_id)
    result = await points.spend_points(
        session,
        principal.actor,
        member,
        TxnType.REDEEM,
        points=points_redeemed,
        reason=_note(reason),
        reference_id=reference_id,
    )
    return _done(request, member, _applied(result, f"Redeemed {points_redeemed} points."))


@router.post("/{member_id}/deduct")
async def deduct(
    request: Request,
    member_id: MemberId,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    points_deducted: PointsField,
    reason: ReasonField,
    require_approval: FormFlag = False,
    reference_id: FormReference = None,
) -> Response:
    """As `POST /api/v1/points/deduct`: above the role's limit, or when asked, the deduction
    is held as an approval request instead of applied."""
    principal = signed_in.principal
    principal.require_scope(Scope.POINTS_DEDUCT)
    member = await get_member(session, principal, member_id)
    payload = DeductRequest(
        member_id=member.public_id,
        points=points_deducted,
        reason=_reason(reason),
        reference_id=reference_id,
        require_approval=require_approval,
    )
    result = await approvals.deduct(session, principal, member, payload)
    if isinstance(result, ApprovalRequest):
        console_session(request).put_pending(
            "sent_for_approval", {"id": result.public_id, "member": member.public_id}
        )
        return _done(
            request,
            member,
            f"Sent for approval: deducting {payload.points} points waits for a manager's "
            f"or an admin's decision ({result.public_id}).",
        )
    return _done(request, member, _applied(result, f"Deducted {payload.points} points."))


def _end_of_day(value: str, program: LoyaltyProgram) -> datetime:
    """The moment a date given in the form ends in the program's time zone, as the
    program's own expiry dates do."""
    try:
        day = date.fromisoformat(value)
    except ValueError as exc:
        raise ValidationFailed(
            "Give the new expiry as a date, YYYY-MM-DD.", details={"field": "expires_on"}
        ) from exc
    if day.year > LAST_EXPIRY_YEAR:
        raise ValidationFailed("The new expiry is too far ahead.", details={"field": "expires_on"})
    local = datetime.combine(day + timedelta(days=1), time.min, tzinfo=ZoneInfo(program.timezone))
    return local.astimezone(UTC)


@router.post("/{member_id}/extend")
async def extend(
    request: Request,
    member_id: MemberId,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    batch_id: Annotated[str, Form(pattern=PUBLIC_ID, max_length=45)],
    expires_on: Annotated[str, Form(pattern=r"^\d{4}-\d{2}-\d{2}$")],
    reason: ReasonField,
) -> Response:
    """As `POST /api/v1/points/extend`: move one of the member's batches' expiry later."""
    principal = signed_in.principal
    principal.require_scope(Scope.POINTS_EXTEND)
    member = await get_member(session, principal, member_id)
    batch = await PointsRepository(session).batch_by_public_id(batch_id)
    if batch is None or batch.member_id != member.id:
        raise NotFound(f"Batch {batch_id} does not exist.", code="BATCH_NOT_FOUND")
    expires_at = _end_of_day(expires_on, await program_service.get_program(session))
    await points.extend_expiry(
        session, principal.actor, member, batch, expires_at=expires_at, reason=_reason(reason)
    )
    return _done(request, member, f"Extended the expiry of {batch_id} to {expires_on}.")


# ------------------------------------------------------------------ membership actions


@router.post("/{member_id}/membership/join")
async def join(
    request: Request,
    member_id: MemberId,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    plan_id: Annotated[str, Form(pattern=PUBLIC_ID, max_length=45)],
    note: OptionalText = None,
) -> Response:
    """As `POST /api/v1/members/{id}/membership/join`."""
    principal = signed_in.principal
    principal.require_scope(Scope.MEMBERSHIPS_WRITE)
    member, term = await memberships.join(session, principal, member_id, plan_id, _note(note))
    return _done(request, member, f"Joined; the membership runs to {term.ends_at:%Y-%m-%d}.")


@router.post("/{member_id}/membership/renew")
async def renew(
    request: Request,
    member_id: MemberId,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    plan_id: Annotated[str | None, Form(max_length=45, pattern=OPTIONAL_PUBLIC_ID)] = None,
    note: OptionalText = None,
) -> Response:
    """As `POST /api/v1/members/{id}/membership/renew` (the current plan unless another is
    chosen)."""
    principal = signed_in.principal
    principal.require_scope(Scope.MEMBERSHIPS_WRITE)
    member, term = await memberships.renew(
        session, principal, member_id, _blank(plan_id), _note(note)
    )
    return _done(request, member, f"Renewed; the membership runs to {term.ends_at:%Y-%m-%d}.")


@router.post("/{member_id}/membership/cancel")
async def cancel(
    request: Request,
    member_id: MemberId,
    session: ConsoleDb,
    signed_in: SignedInStaff,
    at_period_end: FormFlag = False,
    note: OptionalText = None,
) -> Response:
    """As `POST /api/v1/members/{id}/membership/cancel`."""
    principal = signed_in.principal
    principal.require_scope(Scope.MEMBERSHIPS_WRITE)
    member, _term = await memberships.cancel(
        session, principal, member_id, at_period_end=at_period_end, note=_note(note)
    )
    message = (
        "The membership will end when the current term does."
        if member.cancel_at_period_end
        else "Membership cancelled."
    )
    return _done(request, member, message)
