from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response as StarletteResponse

from memberhub.approvals import service as approvals
from memberhub.approvals.models import ApprovalRequest
from memberhub.approvals.schemas import ApprovalOut
from memberhub.auth.dependencies import (
    PointsAwarder,
    PointsDeducter,
    PointsEarner,
    PointsExtender,
    PointsReader,
    PointsRecoverer,
    PointsTransferrer,
)
from memberhub.auth.principal import Principal
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import NotFound, ValidationFailed
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute, error_doc
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath, SafeQuery, UTCDatetime
from memberhub.members.models import Member
from memberhub.members.service import get_member
from memberhub.points import service
from memberhub.points.models import BatchStatus, PointBatch, TxnType
from memberhub.points.repository import PointsRepository, TransactionFilters
from memberhub.points.schemas import (
    AwardRequest,
    BalanceAt,
    BatchOut,
    DeductRequest,
    EarnRequest,
    ExtendRequest,
    OperationResult,
    PointsSummary,
    RecoverRequest,
    RedeemRequest,
    ReverseRequest,
    TransactionOut,
    TransferRequest,
    TransferResult,
)
from memberhub.points.summary import points_summary
from memberhub.program import service as program_service

router = APIRouter(
    prefix="/api/v1", tags=["points"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)
TypeFilter = Annotated[
    list[str] | None, Query(description="Transaction types; repeat for several.", max_length=20)
]
CREATED_OR_REPLAYED: dict[int | str, dict[str, Any]] = {
    200: {"model": OperationResult, "description": "A replay of reference_id"}
}


async def _result(
    session: AsyncSession, member: Member, result: service.LedgerResult, response: Response
) -> OperationResult:
    response.status_code = status.HTTP_200_OK if result.replayed else status.HTTP_201_CREATED
    txn = result.out
    if txn is None:
        (txn,) = await service.transactions_out(session, [(result.transaction, member.public_id)])
    return OperationResult(
        transaction=txn, balance=service.balance_out(result.account), replayed=result.replayed
    )


@router.post("/points/earn", status_code=201, responses=CREATED_OR_REPLAYED)
async def earn(
    payload: EarnRequest, response: Response, session: DbSession, principal: PointsEarner
) -> OperationResult:
    """Points for a purchase: `amount` at the program's earn rate and the member's tier
    multiplier; pending for the program's pending period."""
    member = await get_member(session, principal, payload.member_id)
    result = await service.earn_points(
        session,
        principal.actor,
        member,
        amount=payload.amount,
        currency=payload.currency,
        reference_id=payload.reference_id,
        reason=payload.reason,
    )
    return await _result(session, member, result, response)


@router.post("/points/award", status_code=201, responses=CREATED_OR_REPLAYED)
async def award(
    payload: AwardRequest, response: Response, session: DbSession, principal: PointsAwarder
) -> OperationResult:
    """Manual points, within the caller's role limit."""
    approvals.check_award_limit(
        principal, payload.points, await program_service.get_program(session)
    )
    account = None
    if payload.reference_id is None:
        member, account = await service.member_and_account(session, principal, payload.member_id)
    else:
        member = await get_member(session, principal, payload.member_id)
    result = await service.award_points(
        session,
        principal.actor,
        member,
        points=payload.points,
        reason=payload.reason,
        reference_id=payload.reference_id,
        expires_at=payload.expires_at,
        notify=payload.notify,
        account=account,
    )
    return await _result(session, member, result, response)


@router.post("/points/redeem", status_code=201, responses=CREATED_OR_REPLAYED)
async def redeem(
    payload: RedeemRequest, response: Response, session: DbSession, principal: PointsEarner
) -> OperationResult:
    """Spend points, soonest-expiring first; 409 INSUFFICIENT_POINTS writes nothing."""
    member = await get_member(session, principal, payload.member_id)
    result = await service.spend_points(
        session,
        principal.actor,
        member,
        TxnType.REDEEM,
        points=payload.points,
        reason=payload.reason,
        reference_id=payload.reference_id,
    )
    return await _result(session, member, result, response)


@router.post(
    "/points/deduct",
    status_code=201,
    response_model=OperationResult,
    responses={
        **CREATED_OR_REPLAYED,
        202: {"model": ApprovalOut, "description": "Held for approval"},
    },
)
async def deduct(
    payload: DeductRequest, response: Response, session: DbSession, principal: PointsDeducter
) -> OperationResult | StarletteResponse:
    """Take points away. Above the caller's role limit, or with `require_approval`, the
    deduction becomes an approval request (202) applied when a manager approves it."""
    member = await get_member(session, principal, payload.member_id)
    result = await approvals.deduct(session, principal, member, payload)
    if isinstance(result, ApprovalRequest):
        out = await approvals.to_out(session, result)
        return JSONResponse(
            out.model_dump(mode="json"),
            status_code=202,
            headers={"Location": f"/api/v1/approvals/{result.public_id}"},
        )
    return await _result(session, member, result, response)


@router.post("/points/reverse", status_code=201, responses=CREATED_OR_REPLAYED)
async def reverse(
    payload: ReverseRequest, response: Response, session: DbSession, principal: PointsEarner
) -> OperationResult:
    """Refund an earn: its unspent points are cancelled; spent ones are taken back from the
    balance as the negative-balance policy allows (409 INSUFFICIENT_POINTS otherwise)."""
    if (payload.transaction_id is None) == (payload.earn_reference_id is None):
        raise ValidationFailed("Give exactly one of transaction_id and earn_reference_id.")
    member = await get_member(session, principal, payload.member_id)
    repo = PointsRepository(session)
    earn_txn = (
        await repo.transaction_by_public_id(payload.transaction_id)
        if payload.transaction_id is not None
        else await repo.by_reference(
            TxnType.EARN, service.reference_scope(member), payload.earn_reference_id or ""
        )
    )
    if earn_txn is None or earn_txn.member_id != member.id:
        raise NotFound("The earn to reverse does not exist.", code="TRANSACTION_NOT_FOUND")
    result = await service.reverse_earn(
        session,
        principal.actor,
        member,
        earn=earn_txn,
        points=payload.points,
        reason=payload.reason,
        reference_id=payload.reference_id,
    )
    return await _result(session, member, result, response)


async def _member_batch(
    session: AsyncSession, principal: Principal, batch_public_id: str
) -> tuple[Member, PointBatch]:
    batch = await PointsRepository(session).batch_by_public_id(batch_public_id)
    member = await session.get(Member, batch.member_id) if batch is not None else None
    if (
        batch is None
        or member is None
        or not principal.can_see_organisation(member.organisation_id)
    ):
        raise NotFound(f"Batch {batch_public_id} does not exist.", code="BATCH_NOT_FOUND")
    return await get_member(session, principal, member.public_id), batch


@router.post("/points/extend", status_code=201)
async def extend(
    payload: ExtendRequest, response: Response, session: DbSession, principal: PointsExtender
) -> OperationResult:
    """Move a batch's expiry later."""
    member, batch = await _member_batch(session, principal, payload.batch_id)
    result = await service.extend_expiry(
        session,
        principal.actor,
        member,
        batch,
        expires_at=payload.expires_at,
        reason=payload.reason,
    )
    return await _result(session, member, result, response)


@router.post("/points/recover", status_code=201, responses=CREATED_OR_REPLAYED)
async def recover_points(
    payload: RecoverRequest, response: Response, session: DbSession, principal: PointsRecoverer
) -> OperationResult:
    """Give back expired points (of one batch, or of one expire transaction) with a new
    expiry."""
    if (payload.batch_id is None) == (payload.transaction_id is None):
        raise ValidationFailed("Give exactly one of batch_id and transaction_id.")
    repo = PointsRepository(session)
    if payload.batch_id is not None:
        member, batch = await _member_batch(session, principal, payload.batch_id)
        sources = [batch]
    else:
        txn = await repo.transaction_by_public_id(payload.transaction_id or "")
        owner = await session.get(Member, txn.member_id) if txn is not None else None
        if txn is None or owner is None or txn.type != TxnType.EXPIRE:
            raise NotFound("No expire transaction with that id.", code="TRANSACTION_NOT_FOUND")
        member = await get_member(session, principal, owner.public_id)
        sources = list(await repo.expired_by(txn.id, txn.member_id))
    result = await service.recover_expired(
        session,
        principal.actor,
        member,
        sources,
        points=payload.points,
        expires_at=payload.expires_at,
        reason=payload.reason,
        reference_id=payload.reference_id,
    )
    return await _result(session, member, result, response)


@router.post(
    "/points/transfer",
    status_code=201,
    responses={200: {"model": TransferResult, "description": "A replay of reference_id"}},
)
async def transfer(
    payload: TransferRequest, response: Response, session: DbSession, principal: PointsTransferrer
) -> TransferResult:
    """Move points from one member to another; they keep their expiry."""
    source = await get_member(session, principal, payload.from_member_id)
    target = await get_member(session, principal, payload.to_member_id)
    out_result, in_result = await service.transfer_points(
        session,
        principal.actor,
        source,
        target,
        points=payload.points,
        reason=payload.reason,
        reference_id=payload.reference_id,
    )
    response.status_code = 200 if out_result.replayed else 201
    out_txn, in_txn = await service.transactions_out(
        session,
        [(out_result.transaction, source.public_id), (in_result.transaction, target.public_id)],
    )
    return TransferResult(transfer_out=out_txn, transfer_in=in_txn, replayed=out_result.replayed)


def _type_filter(types: list[str] | None) -> tuple[str, ...]:
    wanted = tuple(types or ())
    unknown = sorted(set(wanted) - set(TxnType.ALL))
    if unknown:
        raise ValidationFailed(
            "Unknown transaction types.",
            details={"unknown_types": unknown[:20], "known_types": list(TxnType.ALL)},
        )
    return wanted


async def _transaction_page(
    session: AsyncSession, filters: TransactionFilters, page: PageParams
) -> Page[TransactionOut]:
    rows = await PointsRepository(session).list_transactions(
        filters, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page([txn for txn, _ in rows], page.limit)
    members = {txn.id: member_public_id for txn, member_public_id in rows}
    data = await service.transactions_out(session, [(t, members[t.id]) for t in items])
    return Page(data=data, pagination=pagination)


@router.get("/points/transactions")
async def list_transactions(
    session: DbSession,
    principal: PointsReader,
    page: Annotated[PageParams, Depends(page_params)],
    member_id: SafeQuery = None,
    type: TypeFilter = None,
    date_from: UTCDatetime | None = None,
    date_to: UTCDatetime | None = None,
    reference_id: SafeQuery = None,
) -> Page[TransactionOut]:
    """Ledger transactions, newest first, with seed 004's filters."""
    member = await get_member(session, principal, member_id) if member_id else None
    filters = TransactionFilters(
        member_id=member.id if member is not None else None,
        organisation_ids=principal.visible_organisation_ids,
        types=_type_filter(type),
        date_from=date_from,
        date_to=date_to,
        reference_id=reference_id,
    )
    return await _transaction_page(session, filters, page)


@router.get("/members/{member_id}/points/transactions")
async def member_transactions(
    member_id: IdPath,
    session: DbSession,
    principal: PointsReader,
    page: Annotated[PageParams, Depends(page_params)],
    type: TypeFilter = None,
    date_from: UTCDatetime | None = None,
    date_to: UTCDatetime | None = None,
) -> Page[TransactionOut]:
    """The member's ledger transactions, newest first."""
    member = await get_member(session, principal, member_id)
    filters = TransactionFilters(
        member_id=member.id, types=_type_filter(type), date_from=date_from, date_to=date_to
    )
    return await _transaction_page(session, filters, page)


@router.get("/members/{member_id}/points")
async def member_points(
    member_id: IdPath, session: DbSession, principal: PointsReader
) -> PointsSummary:
    """Balance, pending, expiring in 30 days, lifetime totals, recent transactions,
    expiration schedule, tier, projected tier and points to the next tier."""
    member = await get_member(session, principal, member_id)
    return await points_summary(session, member, utcnow())


@router.get(
    "/members/{member_id}/points/balance",
    responses={404: error_doc("No such member")},
)
async def balance_at(
    member_id: IdPath,
    session: DbSession,
    principal: PointsReader,
    as_of: UTCDatetime | None = None,
) -> BalanceAt:
    """The balance as it stood at `as_of` (default now), from the transaction log."""
    member = await get_member(session, principal, member_id)
    moment = as_of or utcnow()
    current, pending = await PointsRepository(session).balance_at(member.id, moment)
    return BalanceAt(
        member_id=member.public_id, as_of=moment, current_balance=current, pending_balance=pending
    )


@router.get("/members/{member_id}/points/batches")
async def member_batches(
    member_id: IdPath,
    session: DbSession,
    principal: PointsReader,
    page: Annotated[PageParams, Depends(page_params)],
    status: Annotated[str | None, Query(pattern="^(" + "|".join(BatchStatus.ALL) + ")$")] = None,
) -> Page[BatchOut]:
    """The member's point batches, oldest first."""
    member = await get_member(session, principal, member_id)
    rows = await PointsRepository(session).batches_for_member(
        member.id, status=status, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(
        data=[BatchOut.model_validate(b, from_attributes=True) for b in items],
        pagination=pagination,
    )
