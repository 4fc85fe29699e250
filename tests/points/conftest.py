"""Helpers for the ledger tests: operations through the API and checks against the tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import func, select

from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points.models import (
    BatchStatus,
    PointAccount,
    PointAllocation,
    PointBatch,
    PointTransaction,
    TxnType,
)
from tests.support import ApiClient

POINTS = "/api/v1/points"


async def op(api: ApiClient, operation: str, body: dict[str, Any], expect: int = 201) -> Any:
    response = await api.post(f"{POINTS}/{operation}", body)
    assert response.status_code == expect, response.text
    return response.json()


async def award(api: ApiClient, member_id: str, points: int, **fields: Any) -> Any:
    body = {"member_id": member_id, "points": points, "reason": "test", **fields}
    return await op(api, "award", body)


async def summary(api: ApiClient, member_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/v1/members/{member_id}/points")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def set_program(api: ApiClient, **fields: Any) -> dict[str, Any]:
    response = await api.patch("/api/v1/program", fields)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def ledger_snapshot(db: Database, member_public_id: str) -> dict[str, Any]:
    """Everything the ledger holds for one member, to prove an operation changed nothing."""
    async with db.transaction(read_only=True) as session:
        member_id = await session.scalar(
            select(Member.id).where(Member.public_id == member_public_id)
        )
        account = await session.get(PointAccount, member_id)
        txns = await session.scalar(
            select(func.count()).where(PointTransaction.member_id == member_id)
        )
        batches = (
            await session.execute(
                select(PointBatch.public_id, PointBatch.status, PointBatch.remaining)
                .where(PointBatch.member_id == member_id)
                .order_by(PointBatch.id)
            )
        ).all()
        return {
            "account": None
            if account is None
            else (
                account.current,
                account.pending,
                account.lifetime_earned,
                account.lifetime_redeemed,
                account.lifetime_expired,
            ),
            "transactions": txns,
            "batches": [tuple(row) for row in batches],
        }


def _total(
    txns: Sequence[PointTransaction], types: tuple[str, ...], *, with_pending: bool = False
) -> int:
    return sum(
        t.points + (t.pending_points if with_pending else 0) for t in txns if t.type in types
    )


async def check_ledger(db: Database, member_ids: list[str] | None = None) -> None:
    """The ledger's invariants, for the given members (public ids) or for everyone.

    Balance = sum of remaining in active batches; aggregates match the transaction log;
    every transaction's balance_after is the running sum; every spend's batch allocations
    add up to what it took.
    """
    async with db.transaction(read_only=True) as session:
        query = select(PointAccount)
        if member_ids is not None:
            query = query.join(Member, Member.id == PointAccount.member_id).where(
                Member.public_id.in_(member_ids)
            )
        accounts = (await session.scalars(query)).all()
        for account in accounts:
            batches = (
                await session.scalars(
                    select(PointBatch).where(PointBatch.member_id == account.member_id)
                )
            ).all()
            active = sum(b.remaining for b in batches if b.status == BatchStatus.ACTIVE)
            pending = sum(b.remaining for b in batches if b.status == BatchStatus.PENDING)
            assert account.current == active, (account.member_id, account.current, active)
            assert account.pending == pending, (account.member_id, account.pending, pending)
            # Points owed are paid by the first points to become active: a deficit and
            # spendable points never stand side by side.
            owing = [b for b in batches if b.status == BatchStatus.ACTIVE and b.remaining < 0]
            spendable = [b for b in batches if b.status == BatchStatus.ACTIVE and b.remaining > 0]
            assert not (owing and spendable), (account.member_id, owing, spendable)
            for batch in batches:
                if batch.source != "deficit":
                    assert 0 <= batch.remaining <= batch.initial, batch.public_id
                if batch.status in (BatchStatus.SPENT, BatchStatus.EXPIRED):
                    assert batch.remaining == 0, batch.public_id
            txns = (
                await session.scalars(
                    select(PointTransaction)
                    .where(PointTransaction.member_id == account.member_id)
                    .order_by(PointTransaction.id)
                )
            ).all()

            assert account.current == sum(t.points for t in txns)
            assert account.pending == sum(t.pending_points for t in txns)
            earned = (TxnType.EARN, TxnType.AWARD, TxnType.REVERSE)
            assert account.lifetime_earned == _total(txns, earned, with_pending=True)
            assert account.lifetime_redeemed == -_total(
                txns, (TxnType.REDEEM, TxnType.REDEEM_REFUND)
            )
            assert account.lifetime_expired == -_total(txns, (TxnType.EXPIRE, TxnType.RECOVER))
            assert -_total(txns, (TxnType.EXPIRE,)) == sum(b.expired_points for b in batches)
            running = 0
            running_pending = 0
            for txn in txns:
                running += txn.points
                running_pending += txn.pending_points
                assert txn.balance_after == running, txn.public_id
                assert txn.pending_after == running_pending, txn.public_id
            allocated = (
                dict(
                    (
                        await session.execute(
                            select(PointAllocation.transaction_id, func.sum(PointAllocation.points))
                            .where(PointAllocation.transaction_id.in_([t.id for t in txns]))
                            .group_by(PointAllocation.transaction_id)
                        )
                    ).all()
                )
                if txns
                else {}
            )
            for txn in txns:
                took = allocated.get(txn.id, 0)
                if txn.type in (TxnType.REDEEM, TxnType.DEDUCT, TxnType.TRANSFER_OUT):
                    assert took == -txn.points, txn.public_id
                if txn.type == TxnType.EXPIRE:
                    # One summarised transaction per member and run; the batches say how
                    # much each gave (no allocation rows), each naming the transaction.
                    assert took == 0, txn.public_id
                    named = [b for b in batches if b.expired_transaction_id == txn.id]
                    assert sum(b.expired_points for b in named) == -txn.points, txn.public_id
                    assert len(named) == txn.details["batches"], txn.public_id
                    assert all(b.status == BatchStatus.EXPIRED for b in named), txn.public_id
                if txn.type == TxnType.REVERSE:
                    assert took == txn.details["taken_from_balance"], txn.public_id


@pytest.fixture
async def member(api: ApiClient) -> dict[str, Any]:
    return await api.create_member()
