"""Staff limits and approval requests (seed 004's role permissions).

Limits per role are program configuration. An award above the caller's limit is refused; a
deduction above it, or sent with `require_approval`, waits as an approval request until a
manager or admin other than the requester approves it (applied then) or rejects it.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.approvals.models import ApprovalRequest, ApprovalStatus
from memberhub.approvals.schemas import ApprovalOut
from memberhub.audit.service import record_write
from memberhub.auth.principal import Principal
from memberhub.events.catalog import ApprovalDecided, ApprovalRequested
from memberhub.events.service import emit
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, Forbidden, NotFound
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from memberhub.members.service import get_member
from memberhub.points import service as points
from memberhub.points.models import PointTransaction, TxnType
from memberhub.points.repository import PointsRepository
from memberhub.points.schemas import DeductRequest
from memberhub.program import service as program_service
from memberhub.program.models import LoyaltyProgram
from memberhub.program.schemas import RoleLimit


def _limit(principal: Principal, program: LoyaltyProgram) -> RoleLimit:
    limits = program_service.role_limits(program)
    found: RoleLimit = getattr(limits, str(principal.role))
    return found


def check_award_limit(principal: Principal, points_asked: int, program: LoyaltyProgram) -> None:
    limit = _limit(principal, program).award
    if limit is not None and points_asked > limit:
        raise Forbidden(
            f"The {principal.role} role may award at most {limit} points at once.",
            code="LIMIT_EXCEEDED",
            details={"role": str(principal.role), "limit": limit, "requested": points_asked},
        )


def deduct_needs_approval(principal: Principal, points_asked: int, program: LoyaltyProgram) -> bool:
    limit = _limit(principal, program).deduct
    return limit is not None and points_asked > limit


async def deduct(
    session: AsyncSession, principal: Principal, member: Member, payload: DeductRequest
) -> ApprovalRequest | points.LedgerResult:
    """A deduction as the API and the console take it: held for approval above the
    caller's limit or when asked, applied at once otherwise. A reference names one
    deduction, held or applied: a direct deduction reusing a held one's reference is
    refused, as is holding one whose reference an applied deduction carries (approving it
    would only point at that one)."""
    program = await program_service.get_program(session)
    if payload.require_approval or deduct_needs_approval(principal, payload.points, program):
        return await request_deduction(session, principal, member, payload)
    if payload.reference_id is not None:
        scope = points.reference_scope(member)
        await points.lock_reference(session, TxnType.DEDUCT, scope, payload.reference_id)
        held = await _held_with_reference(session, scope, payload.reference_id)
        if held is not None:
            details = {"reference_id": payload.reference_id}
            if held.member_id == member.id:
                details["approval_id"] = held.public_id
            raise points.ReferenceReused(
                f"reference_id '{payload.reference_id}' was used for a deduction held for "
                "approval.",
                details=details,
            )
    return await points.spend_points(
        session,
        principal.actor,
        member,
        TxnType.DEDUCT,
        points=payload.points,
        reason=payload.reason,
        reference_id=payload.reference_id,
    )


async def _held_with_reference(
    session: AsyncSession, scope: int, reference_id: str
) -> ApprovalRequest | None:
    return await session.scalar(
        select(ApprovalRequest).where(
            ApprovalRequest.reference_scope == scope,
            ApprovalRequest.reference_id == reference_id,
        )
    )


async def request_deduction(
    session: AsyncSession, principal: Principal, member: Member, payload: DeductRequest
) -> ApprovalRequest:
    """Hold a deduction for approval; a repeat with the same reference_id in the member's
    organisation returns it."""
    scope = points.reference_scope(member)
    if payload.reference_id is not None:
        await points.lock_reference(session, TxnType.DEDUCT, scope, payload.reference_id)
        existing = await _held_with_reference(session, scope, payload.reference_id)
        if existing is not None:
            if (
                existing.member_id != member.id
                or existing.points != payload.points
                or existing.reason != payload.reason
            ):
                raise points.ReferenceReused(
                    f"reference_id '{payload.reference_id}' was used for another deduction."
                )
            return existing
        applied = await PointsRepository(session).by_reference(
            TxnType.DEDUCT, scope, payload.reference_id
        )
        if applied is not None:
            raise points.reference_reused(TxnType.DEDUCT, payload.reference_id, applied, member)
    now = utcnow()
    approval = ApprovalRequest(
        public_id=new_public_id("apr"),
        operation=TxnType.DEDUCT,
        member_id=member.id,
        points=payload.points,
        reason=payload.reason,
        reference_id=payload.reference_id,
        reference_scope=scope if payload.reference_id is not None else None,
        payload={"require_approval": payload.require_approval},
        status=ApprovalStatus.PENDING,
        requested_by=principal.actor.id,
        requested_role=str(principal.role),
        created_at=now,
    )
    session.add(approval)
    await session.flush()
    emit(
        session,
        ApprovalRequested(
            approval_id=approval.public_id,
            operation=approval.operation,
            member_id=member.public_id,
            points=approval.points,
            reason=approval.reason,
            requested_by=approval.requested_by,
            occurred_at=now,
        ),
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
        occurred_at=now,
    )
    record_write(
        session,
        principal.actor,
        action="approval.request",
        object_type="approval",
        object_id=approval.public_id,
        changes={
            "operation": approval.operation,
            "member_id": member.public_id,
            "points": approval.points,
        },
    )
    return approval


async def get_approval(
    session: AsyncSession, principal: Principal, public_id: str, *, for_update: bool = False
) -> tuple[ApprovalRequest, Member]:
    query = select(ApprovalRequest).where(ApprovalRequest.public_id == public_id)
    if for_update:
        query = query.with_for_update()
    approval = await session.scalar(query)
    member = await session.get(Member, approval.member_id) if approval is not None else None
    if (
        approval is None
        or member is None
        or member.deleted_at is not None  # erased: nothing is left to decide on
        or not principal.can_see_organisation(member.organisation_id)
    ):
        raise NotFound(f"Approval request {public_id} does not exist.", code="APPROVAL_NOT_FOUND")
    return approval, member


def _require_pending(approval: ApprovalRequest, principal: Principal) -> None:
    if approval.status != ApprovalStatus.PENDING:
        raise Conflict(
            f"Approval request {approval.public_id} was already {approval.status}.",
            code="APPROVAL_DECIDED",
            details={"status": approval.status},
        )
    if approval.requested_by == principal.actor.id:
        raise Forbidden(
            "A request must be decided by someone other than its requester.",
            code="SELF_APPROVAL",
        )


def _decided(
    session: AsyncSession, approval: ApprovalRequest, member: Member, *, transaction_id: str | None
) -> None:
    assert approval.decided_by is not None
    assert approval.decided_at is not None
    emit(
        session,
        ApprovalDecided(
            approval_id=approval.public_id,
            operation=approval.operation,
            member_id=member.public_id,
            points=approval.points,
            decision="approved" if approval.status == ApprovalStatus.APPROVED else "rejected",
            decided_by=approval.decided_by,
            note=approval.decision_note,
            transaction_id=transaction_id,
            occurred_at=approval.decided_at,
        ),
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
        occurred_at=approval.decided_at,
    )


async def approve(
    session: AsyncSession, principal: Principal, public_id: str, note: str | None
) -> ApprovalRequest:
    """Apply the held deduction now; if the balance no longer covers it, 409 and the request
    stays pending."""
    approval, member = await get_approval(session, principal, public_id, for_update=True)
    _require_pending(approval, principal)
    member = await get_member(session, principal, member.public_id)
    result = await points.spend_points(
        session,
        principal.actor,
        member,
        TxnType.DEDUCT,
        points=approval.points,
        reason=approval.reason,
        reference_id=approval.reference_id,
        details={"approval_id": approval.public_id, "requested_by": approval.requested_by},
        # The reference was taken when the deduction was held, in the organisation the
        # member was in then: a deduction with it in another one since is not this one.
        scope=approval.reference_scope,
    )
    approval.status = ApprovalStatus.APPROVED
    approval.decided_by = principal.actor.id
    approval.decided_at = utcnow()
    approval.decision_note = note
    approval.transaction_id = result.transaction.id
    await session.flush()
    _decided(session, approval, member, transaction_id=result.transaction.public_id)
    record_write(
        session,
        principal.actor,
        action="approval.approve",
        object_type="approval",
        object_id=approval.public_id,
        changes={"transaction_id": result.transaction.public_id, "note": note},
    )
    return approval


async def reject(
    session: AsyncSession, principal: Principal, public_id: str, note: str | None
) -> ApprovalRequest:
    approval, member = await get_approval(session, principal, public_id, for_update=True)
    _require_pending(approval, principal)
    approval.status = ApprovalStatus.REJECTED
    approval.decided_by = principal.actor.id
    approval.decided_at = utcnow()
    approval.decision_note = note
    await session.flush()
    _decided(session, approval, member, transaction_id=None)
    record_write(
        session,
        principal.actor,
        action="approval.reject",
        object_type="approval",
        object_id=approval.public_id,
        changes={"note": note},
    )
    return approval


async def list_approvals(
    session: AsyncSession,
    principal: Principal,
    *,
    status: str | None,
    after_id: int | None,
    limit: int,
) -> Sequence[ApprovalRequest]:
    """Newest first, paged by id; not those of erased members (gone, as they are)."""
    query = (
        select(ApprovalRequest)
        .join(Member, Member.id == ApprovalRequest.member_id)
        .where(Member.deleted_at.is_(None))
        .order_by(ApprovalRequest.id.desc())
        .limit(limit + 1)
    )
    if principal.visible_organisation_ids is not None:
        query = query.where(Member.organisation_id.in_(principal.visible_organisation_ids))
    if status is not None:
        query = query.where(ApprovalRequest.status == status)
    if after_id is not None:
        query = query.where(ApprovalRequest.id < after_id)
    return (await session.scalars(query)).all()


async def to_out_many(
    session: AsyncSession, approvals: Sequence[ApprovalRequest]
) -> list[ApprovalOut]:
    member_ids = {a.member_id for a in approvals}
    txn_ids = {a.transaction_id for a in approvals if a.transaction_id is not None}
    members: dict[int, str] = {}
    if member_ids:
        rows = await session.execute(
            select(Member.id, Member.public_id).where(Member.id.in_(member_ids))
        )
        members = {row[0]: row[1] for row in rows}
    txns: dict[int, str] = {}
    if txn_ids:
        txn_rows = await session.execute(
            select(PointTransaction.id, PointTransaction.public_id).where(
                PointTransaction.id.in_(txn_ids)
            )
        )
        txns = {row[0]: row[1] for row in txn_rows}
    return [
        ApprovalOut(
            id=a.public_id,
            operation=a.operation,
            member_id=members[a.member_id],
            points=a.points,
            reason=a.reason,
            reference_id=a.reference_id,
            status=a.status,
            requested_by=a.requested_by,
            requested_role=a.requested_role,
            decided_by=a.decided_by,
            decision_note=a.decision_note,
            transaction_id=txns.get(a.transaction_id) if a.transaction_id else None,
            created_at=a.created_at,
            decided_at=a.decided_at,
        )
        for a in approvals
    ]


async def to_out(session: AsyncSession, approval: ApprovalRequest) -> ApprovalOut:
    return (await to_out_many(session, [approval]))[0]
