"""Membership plans and the member lifecycle.

pending → active → grace → lapsed, plus suspended and cancelled. Renewal extends from the
previous term's end while the member is inside the renewal window or the grace period.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.events.catalog import MemberStatusChanged, MemberUpdated
from memberhub.events.service import emit
from memberhub.kit.actor import Actor
from memberhub.kit.clock import add_months, utcnow
from memberhub.kit.errors import Conflict, Forbidden, InvalidTransition, NotFound
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member, MemberStatus
from memberhub.members.service import get_member
from memberhub.members.service import to_out as member_out
from memberhub.memberships.models import MembershipPlan, MembershipTerm, MemberStatusChange
from memberhub.memberships.repository import PlanRepository, TermRepository
from memberhub.memberships.schemas import PlanCreate, PlanOut, PlanPatch, TermOut
from memberhub.organisations.repository import OrganisationRepository
from memberhub.organisations.service import get_visible as get_visible_organisation
from memberhub.program import service as program_service

S = MemberStatus


# ---------------------------------------------------------------- plans


def _plan_snapshot(plan: MembershipPlan) -> dict[str, Any]:
    return {
        "code": plan.code,
        "name": plan.name,
        "term_months": plan.term_months,
        "price_amount": plan.price_amount,
        "currency": plan.currency,
        "grace_days": plan.grace_days,
        "renewal_window_days": plan.renewal_window_days,
        "auto_renew": plan.auto_renew,
        "active": plan.active,
    }


async def plans_to_out(session: AsyncSession, plans: list[MembershipPlan]) -> list[PlanOut]:
    org_ids = {p.organisation_id for p in plans if p.organisation_id is not None}
    orgs = await OrganisationRepository(session).public_ids(org_ids)
    return [
        PlanOut(
            id=p.public_id,
            organisation_id=orgs.get(p.organisation_id) if p.organisation_id else None,
            created_at=p.created_at,
            updated_at=p.updated_at,
            **_plan_snapshot(p),
        )
        for p in plans
    ]


async def get_plan(session: AsyncSession, principal: Principal, public_id: str) -> MembershipPlan:
    plan = await PlanRepository(session).get_by_public_id(public_id)
    if plan is None or (
        plan.organisation_id is not None
        and not principal.can_see_organisation(plan.organisation_id)
    ):
        raise NotFound(f"Plan {public_id} does not exist.", code="PLAN_NOT_FOUND")
    return plan


async def create_plan(
    session: AsyncSession, principal: Principal, payload: PlanCreate
) -> MembershipPlan:
    organisation_id = principal.organisation_id
    if payload.organisation_id is not None:
        organisation_id = (
            await get_visible_organisation(session, principal, payload.organisation_id)
        ).id
    if await PlanRepository(session).get_by_code(payload.code) is not None:
        raise Conflict(f"A plan with code '{payload.code}' exists.", code="DUPLICATE_PLAN_CODE")
    plan = MembershipPlan(
        public_id=new_public_id("pln"),
        organisation_id=organisation_id,
        **payload.model_dump(exclude={"organisation_id"}),
    )
    session.add(plan)
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="plan.create",
        object_type="plan",
        object_id=plan.public_id,
        changes=diff({}, _plan_snapshot(plan)),
    )
    return plan


def _require_plan_writable(principal: Principal, plan: MembershipPlan) -> None:
    """Installation-wide plans are written by unbound keys only; an organisation's plan by
    keys whose organisations include it."""
    if not principal.can_see_organisation(plan.organisation_id):
        raise Forbidden("This API key may not change this plan.")


async def update_plan(
    session: AsyncSession, principal: Principal, public_id: str, payload: PlanPatch
) -> MembershipPlan:
    plan = await get_plan(session, principal, public_id)
    _require_plan_writable(principal, plan)
    before = _plan_snapshot(plan)
    for field, value in payload.model_dump(exclude_unset=True, exclude_none=True).items():
        setattr(plan, field, value)
    changes = diff(before, _plan_snapshot(plan))
    if changes:
        await session.flush()
        record_write(
            session,
            principal.actor,
            action="plan.update",
            object_type="plan",
            object_id=plan.public_id,
            changes=changes,
        )
    return plan


# ---------------------------------------------------------------- lifecycle


def term_to_out(term: MembershipTerm, plan_public_id: str) -> TermOut:
    return TermOut(
        id=term.public_id,
        plan_id=plan_public_id,
        kind=term.kind,
        starts_at=term.starts_at,
        ends_at=term.ends_at,
        ended_early_at=term.ended_early_at,
    )


def _require_status(member: Member, operation: str, allowed: tuple[str, ...]) -> None:
    if member.status not in allowed:
        raise InvalidTransition(
            f"Cannot {operation} a member whose status is '{member.status}'.",
            details={"status": member.status, "allowed_from": list(allowed)},
        )


async def _usable_plan(
    session: AsyncSession, principal: Principal, public_id: str, member: Member
) -> MembershipPlan:
    """A plan the member may hold: offered, and installation-wide or of the member's
    organisation or one above it (a chapter's member may hold its HQ's plans, never
    another chapter's)."""
    plan = await get_plan(session, principal, public_id)
    if not plan.active:
        raise Conflict(f"Plan {public_id} is no longer offered.", code="PLAN_INACTIVE")
    await _check_plan_organisation(session, plan, member)
    return plan


async def _check_plan_organisation(
    session: AsyncSession, plan: MembershipPlan, member: Member
) -> None:
    """Refuse a plan of an organisation the member is not of (nor of one of its chapters):
    one the member was given before moving to another organisation too."""
    if plan.organisation_id is not None and (
        member.organisation_id is None
        or member.organisation_id
        not in await OrganisationRepository(session).subtree_ids(plan.organisation_id)
    ):
        raise Conflict(
            f"Plan {plan.public_id} is an organisation's own, and member {member.public_id} "
            "is not of that organisation or its chapters.",
            code="PLAN_OF_ANOTHER_ORGANISATION",
        )


async def _term_end(
    session: AsyncSession, starts_at: datetime, months: int, anchor: datetime | None
) -> datetime:
    """`months` calendar months after `starts_at`, counted on the program's calendar: joined
    1 March at 10:00 in Auckland (28 February in UTC), a month ends 1 April at 10:00 there,
    not 29 March. `anchor`: when the run of terms began, whose day of the month the end
    keeps (joined 31 Jan, monthly: 29 Feb, then 31 Mar)."""
    zone = ZoneInfo((await program_service.get_program(session)).timezone)
    local = starts_at.astimezone(zone).replace(tzinfo=None)
    anchor_day = anchor.astimezone(zone).day if anchor is not None else None
    ended = add_months(local, months, anchor_day=anchor_day)
    return ended.replace(tzinfo=zone).astimezone(UTC)


async def _start_term(
    session: AsyncSession,
    member: Member,
    plan: MembershipPlan,
    kind: str,
    starts_at: datetime,
    *,
    anchor: datetime | None = None,
) -> MembershipTerm:
    """A term of `plan` from `starts_at`, continuing the run that began at `anchor` (see
    `_term_end`)."""
    ends_at = await _term_end(session, starts_at, plan.term_months, anchor)
    term = MembershipTerm(
        public_id=new_public_id("trm"),
        member_id=member.id,
        plan_id=plan.id,
        kind=kind,
        starts_at=starts_at,
        ends_at=ends_at,
    )
    session.add(term)
    member.plan = plan
    member.plan_id = plan.id
    member.term_ends_at = ends_at
    member.grace_ends_at = ends_at + timedelta(days=plan.grace_days)
    member.cancel_at_period_end = False
    if member.member_since is None:
        member.member_since = starts_at
    return term


async def _end_open_terms(
    session: AsyncSession, member: Member, now: datetime
) -> MembershipTerm | None:
    """End the running term now and void future (prepaid) ones; return the term in force.
    The member's term then ends now, not when the voided ones would have."""
    running = None
    for term in await TermRepository(session).open_terms(member.id, now):
        term.ended_early_at = now
        if term.starts_at <= now:
            running = term
    if member.term_ends_at is not None and member.term_ends_at > now:
        member.term_ends_at = now
    if running is None:
        running = await TermRepository(session).current(member.id, now)
    return running


def _membership_snapshot(member: Member) -> dict[str, Any]:
    return {
        "status": member.status,
        "plan_id": member.plan.public_id if member.plan else None,
        "term_ends_at": member.term_ends_at,
        "grace_ends_at": member.grace_ends_at,
        "cancel_at_period_end": member.cancel_at_period_end,
    }


async def _record_change(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    *,
    before: dict[str, Any],
    to_status: str,
    reason: str,
    note: str | None,
    now: datetime,
) -> None:
    """Apply the status and write history, event and audit in the caller's transaction."""
    from_status = before["status"]
    member.status = to_status
    member.updated_at = now
    session.add(
        MemberStatusChange(
            member_id=member.id,
            from_status=from_status,
            to_status=to_status,
            reason=reason,
            note=note,
            actor=actor.id,
            occurred_at=now,
        )
    )
    await session.flush()
    emit(
        session,
        MemberStatusChanged(
            member_id=member.public_id,
            organisation_id=member.organisation.public_id if member.organisation else None,
            from_status=from_status,
            to_status=to_status,
            reason=reason,
            plan_id=member.plan.public_id if member.plan else None,
            term_ends_at=member.term_ends_at,
            grace_ends_at=member.grace_ends_at,
            occurred_at=now,
        ),
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
        occurred_at=now,
    )
    record_write(
        session,
        actor,
        action=f"membership.{reason}",
        object_type="member",
        object_id=member.public_id,
        changes=diff(before, _membership_snapshot(member)),
    )


async def join(
    session: AsyncSession, principal: Principal, member_id: str, plan_id: str, note: str | None
) -> tuple[Member, MembershipTerm]:
    member = await get_member(session, principal, member_id, for_update=True)
    _require_status(member, "join", (S.PENDING, S.LAPSED, S.CANCELLED))
    plan = await _usable_plan(session, principal, plan_id, member)
    now = utcnow()
    before = _membership_snapshot(member)
    term = await _start_term(session, member, plan, "join", now)
    await _record_change(
        session, principal.actor, member,
        before=before, to_status=S.ACTIVE, reason="join", note=note, now=now,
    )  # fmt: skip
    return member, term


async def renew(
    session: AsyncSession,
    principal: Principal,
    member_id: str,
    plan_id: str | None,
    note: str | None,
    *,
    now: datetime | None = None,
    enforce_window: bool = True,
) -> tuple[Member, MembershipTerm]:
    """Add a term. A payment already taken renews whatever the window (`enforce_window`
    False): refusing it would lose the member's money."""
    member = await get_member(session, principal, member_id, for_update=True)
    _require_status(member, "renew", (S.ACTIVE, S.GRACE, S.LAPSED))
    now = now or utcnow()
    if plan_id is not None:
        plan = await _usable_plan(session, principal, plan_id, member)
    elif member.plan is not None:
        plan = member.plan
        if not plan.active:
            raise Conflict(
                "The member's plan is no longer offered; renew onto another plan_id.",
                code="PLAN_INACTIVE",
            )
        await _check_plan_organisation(session, plan, member)
    else:
        raise Conflict("The member has no plan to renew; give a plan_id.", code="NO_PLAN")
    assert member.term_ends_at is not None or member.status == S.LAPSED
    if member.status == S.ACTIVE:
        assert member.term_ends_at is not None
        window_days = (member.plan or plan).renewal_window_days
        window_opens = member.term_ends_at - timedelta(days=window_days)
        if enforce_window and now < window_opens:
            raise Conflict(
                "The renewal window has not opened yet.",
                code="RENEWAL_WINDOW_NOT_OPEN",
                details={"opens_at": window_opens.isoformat()},
            )
        starts_at = member.term_ends_at
    elif member.status == S.GRACE:
        assert member.term_ends_at is not None
        starts_at = member.term_ends_at
    else:
        starts_at = now
    anchor = None
    if starts_at == member.term_ends_at:
        # Back to back with the term before: the run keeps the day it started on.
        anchor = await TermRepository(session).run_start(member.id, starts_at)
        ends_at = await _term_end(session, starts_at, plan.term_months, anchor)
        if ends_at <= now:
            # A grace longer than the term: back to back, the new term would be over
            # already (an active member with nothing to use). It starts today instead.
            starts_at, anchor = now, None
    before = _membership_snapshot(member)
    term = await _start_term(session, member, plan, "renew", starts_at, anchor=anchor)
    await _record_change(
        session, principal.actor, member,
        before=before, to_status=S.ACTIVE, reason="renew", note=note, now=now,
    )  # fmt: skip
    return member, term


async def upgrade(
    session: AsyncSession, principal: Principal, member_id: str, plan_id: str, note: str | None
) -> tuple[Member, MembershipTerm]:
    member = await get_member(session, principal, member_id, for_update=True)
    _require_status(member, "change the plan of", (S.ACTIVE, S.GRACE))
    plan = await _usable_plan(session, principal, plan_id, member)
    if member.plan_id == plan.id:
        raise Conflict("The member is already on this plan.", code="SAME_PLAN")
    now = utcnow()
    before = _membership_snapshot(member)
    await _end_open_terms(session, member, now)
    term = await _start_term(session, member, plan, "upgrade", now)
    await _record_change(
        session, principal.actor, member,
        before=before, to_status=S.ACTIVE, reason="upgrade", note=note, now=now,
    )  # fmt: skip
    return member, term


async def lapse(
    session: AsyncSession, principal: Principal, member_id: str, note: str | None
) -> tuple[Member, MembershipTerm | None]:
    member = await get_member(session, principal, member_id, for_update=True)
    _require_status(member, "lapse", (S.ACTIVE, S.GRACE))
    now = utcnow()
    before = _membership_snapshot(member)
    term = await _end_open_terms(session, member, now)
    member.grace_ends_at = None
    await _record_change(
        session, principal.actor, member,
        before=before, to_status=S.LAPSED, reason="lapse", note=note, now=now,
    )  # fmt: skip
    return member, term


async def cancel(
    session: AsyncSession,
    principal: Principal,
    member_id: str,
    *,
    at_period_end: bool,
    note: str | None,
) -> tuple[Member, MembershipTerm | None]:
    member = await get_member(session, principal, member_id, for_update=True)
    now = utcnow()
    before = _membership_snapshot(member)
    if at_period_end:
        _require_status(member, "schedule the cancellation of", (S.ACTIVE, S.GRACE))
        if member.status == S.ACTIVE:
            if member.cancel_at_period_end:
                raise Conflict("Cancellation is already scheduled.", code="ALREADY_SCHEDULED")
            member.cancel_at_period_end = True
            member.grace_ends_at = None  # no grace follows a term that is to end the member
            member.updated_at = now
            await session.flush()
            # Not a status change yet (that comes at the term's end): what consumers of the
            # member see is its membership saying so.
            emit(
                session,
                MemberUpdated(
                    member=member_out(member),
                    changed_fields=["membership.cancel_at_period_end"],
                ),
                organisation_id=member.organisation_id,
                member_public_id=member.public_id,
                occurred_at=now,
            )
            record_write(
                session,
                principal.actor,
                action="membership.cancel_scheduled",
                object_type="member",
                object_id=member.public_id,
                changes=diff(before, _membership_snapshot(member)),
            )
            return member, await TermRepository(session).current(member.id, now)
        # In grace the paid period is already over: cancel now.
    _require_status(member, "cancel", (S.PENDING, S.ACTIVE, S.GRACE, S.LAPSED, S.SUSPENDED))
    term = await _end_open_terms(session, member, now)
    _clear_schedule(member)
    await _record_change(
        session, principal.actor, member,
        before=before, to_status=S.CANCELLED, reason="cancel", note=note, now=now,
    )  # fmt: skip
    return member, term


async def record_failed_payment(
    session: AsyncSession,
    principal: Principal,
    member_id: str,
    *,
    grace_days: int,
    note: str | None,
    now: datetime | None = None,
) -> Member:
    """An active member's payment failed: grace of `grace_days` follows the paid term.

    A failed payment never takes away time paid for, and ends no term. While the paid term
    runs (a later invoice failing right after a paid renewal, a renewal attempted early,
    events out of order) the member stays active to its end and the scheduled job moves
    them to grace then; a member whose term is over moves to grace now. Grace already
    longer (the plan's) is kept.
    """
    member = await get_member(session, principal, member_id, for_update=True)
    _require_status(member, "record a failed payment of", (S.ACTIVE,))
    now = now or utcnow()
    before = _membership_snapshot(member)
    paid_until = member.term_ends_at if member.term_ends_at is not None else now
    grace_ends_at = max(paid_until, now) + timedelta(days=grace_days)
    if member.grace_ends_at is None or member.grace_ends_at < grace_ends_at:
        member.grace_ends_at = grace_ends_at
    if paid_until <= now:
        await _record_change(
            session, principal.actor, member,
            before=before, to_status=S.GRACE, reason="payment_failed", note=note, now=now,
        )  # fmt: skip
        return member
    changes = diff(before, _membership_snapshot(member))
    if changes:
        member.updated_at = now
        await session.flush()
        record_write(
            session,
            principal.actor,
            action="membership.payment_failed",
            object_type="member",
            object_id=member.public_id,
            changes=changes,
        )
    return member


async def suspend(
    session: AsyncSession, principal: Principal, member_id: str, note: str | None
) -> Member:
    member = await get_member(session, principal, member_id, for_update=True)
    _require_status(member, "suspend", (S.ACTIVE, S.GRACE))
    now = utcnow()
    before = _membership_snapshot(member)
    await _record_change(
        session, principal.actor, member,
        before=before, to_status=S.SUSPENDED, reason="suspend", note=note, now=now,
    )  # fmt: skip
    return member


def status_for_dates(member: Member, now: datetime) -> str:
    """Where a member's dates put them, ignoring suspension and cancellation."""
    if member.term_ends_at is None:
        return S.PENDING
    if now < member.term_ends_at:
        return S.ACTIVE
    if member.grace_ends_at is not None and now < member.grace_ends_at:
        return S.GRACE
    return S.LAPSED


def _status_due(member: Member, now: datetime) -> str:
    """Where the dates put a member, honouring a cancellation scheduled for the period end."""
    if (
        member.cancel_at_period_end
        and member.term_ends_at is not None
        and now >= member.term_ends_at
    ):
        return S.CANCELLED
    return status_for_dates(member, now)


def _clear_schedule(member: Member) -> None:
    """A member cancelled at the period end has no grace and nothing left scheduled."""
    member.cancel_at_period_end = False
    member.grace_ends_at = None


async def reinstate(
    session: AsyncSession, principal: Principal, member_id: str, note: str | None
) -> Member:
    member = await get_member(session, principal, member_id, for_update=True)
    _require_status(member, "reinstate", (S.SUSPENDED,))
    now = utcnow()
    before = _membership_snapshot(member)
    target = _status_due(member, now)
    if target == S.CANCELLED:
        _clear_schedule(member)
    await _record_change(
        session, principal.actor, member,
        before=before, to_status=target, reason="reinstate", note=note, now=now,
    )  # fmt: skip
    return member


async def advance_due_member(
    session: AsyncSession, actor: Actor, member: Member, now: datetime
) -> bool:
    """Move one member along active → grace → lapsed (or → cancelled at period end)."""
    before = _membership_snapshot(member)
    target = _status_due(member, now)
    if target == member.status:
        return False
    if target == S.CANCELLED:
        _clear_schedule(member)
    reason = {S.CANCELLED: "cancel", S.GRACE: "grace"}.get(target, "lapse")
    await _record_change(
        session, actor, member, before=before, to_status=target, reason=reason, note=None, now=now
    )
    return True
