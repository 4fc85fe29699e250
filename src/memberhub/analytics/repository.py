"""Ledger aggregates for analytics: one set-based statement per figure, never a loop over
members. Callers limited to some organisations pass their ids; only then are the ledger rows
joined to `members` to filter them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute, aliased

from memberhub.kit.db import UTCDateTime
from memberhub.members.models import Member
from memberhub.points.models import PointAccount, PointBatch, PointTransaction, TxnType


@dataclass(frozen=True)
class Liability:
    """Points the program owes at one moment."""

    holders: int  # members with a positive balance
    outstanding: int  # the sum of positive balances
    pending: int  # earned but not yet spendable

    @property
    def total(self) -> int:
        return self.outstanding + self.pending


@dataclass(frozen=True)
class OrderTotals:
    """A member's purchases, as recorded by their earn transactions."""

    order_count: int
    spend: int  # minor units of the program currency
    earned_points: int


AnySelect = Select[*tuple[Any, ...]]
QueryT = TypeVar("QueryT", bound=AnySelect)
Column = ColumnElement[int] | InstrumentedAttribute[int]


def _scoped(query: QueryT, member_id: Column, organisation_ids: frozenset[int] | None) -> QueryT:
    if organisation_ids is None:
        return query
    return query.join(Member, Member.id == member_id).where(
        Member.organisation_id.in_(organisation_ids)
    )


def _held(
    query: QueryT,
    member_id: Column,
    organisation_ids: frozenset[int] | None,
    moment: datetime | None,
) -> QueryT:
    """`query` over the balances members held at `moment` (None: now): `_scoped`, and only
    members not erased by then. An erased member's points can no longer be used by anyone:
    they are no liability, and the member is counted in no figure, as in `members_count`."""
    query = query.join(Member, Member.id == member_id)
    if organisation_ids is not None:
        query = query.where(Member.organisation_id.in_(organisation_ids))
    if moment is None:
        return query.where(Member.deleted_at.is_(None))
    return query.where(or_(Member.deleted_at.is_(None), Member.deleted_at > moment))


def _liability_columns(balance: Column, pending: Column) -> tuple[ColumnElement[Any], ...]:
    return (
        func.coalesce(func.sum(case((balance > 0, 1), else_=0)), 0),
        func.coalesce(func.sum(case((balance > 0, balance), else_=0)), 0),
        func.coalesce(func.sum(pending), 0),
    )


class AnalyticsRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def _liability(self, query: AnySelect) -> Liability:
        row = (await self.session.execute(query)).one()
        return Liability(holders=int(row[0]), outstanding=int(row[1]), pending=int(row[2]))

    async def liability_now(self, organisation_ids: frozenset[int] | None) -> Liability:
        """From the accounts, which the ledger keeps current."""
        query = select(*_liability_columns(PointAccount.current, PointAccount.pending))
        query = _held(
            query.select_from(PointAccount), PointAccount.member_id, organisation_ids, None
        )
        return await self._liability(query)

    async def liability_at(
        self, moment: datetime, organisation_ids: frozenset[int] | None
    ) -> Liability:
        """From the transaction log: each member's balances after their last transaction at
        or before `moment` (the same reading as a member's balance at a moment)."""
        ranked = select(
            PointTransaction.balance_after.label("balance"),
            PointTransaction.pending_after.label("pending"),
            func.row_number()
            .over(
                partition_by=PointTransaction.member_id,
                order_by=(PointTransaction.occurred_at.desc(), PointTransaction.id.desc()),
            )
            .label("position"),
        ).where(PointTransaction.occurred_at <= moment)
        latest = _held(ranked, PointTransaction.member_id, organisation_ids, moment).subquery()
        query = select(*_liability_columns(latest.c.balance, latest.c.pending)).where(
            latest.c.position == 1
        )
        return await self._liability(query)

    async def liability_at_many(
        self, moments: Sequence[datetime], organisation_ids: frozenset[int] | None
    ) -> dict[datetime, Liability]:
        """`liability_at` for each of `moments`, in one statement that reads, for every
        account and moment, the member's last transaction at or before it through the
        (member, occurred_at, id) index: members x moments index lookups instead of a sort
        of the whole log per moment."""
        distinct = sorted(set(moments))
        if not distinct:
            return {}
        # Members erased by a moment (a copy of the table of its own, whatever is joined).
        erased = aliased(Member)
        points = union_all(
            *(select(literal(moment, UTCDateTime()).label("at")) for moment in distinct)
        ).subquery("moments")
        last = (
            select(PointTransaction.id)
            .where(
                PointTransaction.member_id == PointAccount.member_id,
                PointTransaction.occurred_at <= points.c.at,
            )
            .order_by(PointTransaction.occurred_at.desc(), PointTransaction.id.desc())
            .limit(1)
            .correlate(PointAccount, points)
            .scalar_subquery()
        )
        latest = (
            _scoped(
                select(points.c.at, last.label("txn_id"))
                .select_from(PointAccount)
                .join(points, literal(True)),
                PointAccount.member_id,
                organisation_ids,
            )
            .where(
                ~exists().where(
                    erased.id == PointAccount.member_id, erased.deleted_at <= points.c.at
                )
            )
            .subquery("latest")
        )
        query = (
            select(
                latest.c.at,
                *_liability_columns(PointTransaction.balance_after, PointTransaction.pending_after),
            )
            .select_from(latest)
            .join(PointTransaction, PointTransaction.id == latest.c.txn_id)
            .group_by(latest.c.at)
        )
        found = {
            row[0]: Liability(holders=int(row[1]), outstanding=int(row[2]), pending=int(row[3]))
            for row in await self.session.execute(query)
        }
        empty = Liability(holders=0, outstanding=0, pending=0)
        return {moment: found.get(moment, empty) for moment in moments}

    async def movements(
        self,
        start: datetime,
        end: datetime,
        types: Sequence[str],
        organisation_ids: frozenset[int] | None,
    ) -> dict[str, int]:
        """Net points (current and pending) moved by each transaction type in (start, end]."""
        query = (
            select(
                PointTransaction.type,
                func.coalesce(
                    func.sum(PointTransaction.points + PointTransaction.pending_points), 0
                ),
            )
            .where(
                PointTransaction.type.in_(types),
                PointTransaction.occurred_at > start,
                PointTransaction.occurred_at <= end,
            )
            .group_by(PointTransaction.type)
        )
        rows = await self.session.execute(
            _scoped(query, PointTransaction.member_id, organisation_ids)
        )
        return {row[0]: int(row[1]) for row in rows}

    async def members_count(self, moment: datetime, organisation_ids: frozenset[int] | None) -> int:
        """Members that existed at `moment` (created by then and not deleted before)."""
        query = select(func.count(Member.id)).where(
            Member.created_at <= moment,
            or_(Member.deleted_at.is_(None), Member.deleted_at > moment),
        )
        if organisation_ids is not None:
            query = query.where(Member.organisation_id.in_(organisation_ids))
        return int(await self.session.scalar(query) or 0)

    async def order_totals(self, member_id: int, currency: str) -> OrderTotals:
        """The member's earn transactions, leaving out earns reversed in full; spend adds
        the amounts recorded in `currency` only."""
        fully_reversed = and_(
            PointBatch.id.is_not(None), PointBatch.reversed_points >= PointBatch.initial
        )
        spend = case(
            (
                and_(PointTransaction.amount.is_not(None), PointTransaction.currency == currency),
                PointTransaction.amount,
            ),
            else_=0,
        )
        query = (
            select(
                func.count(PointTransaction.id),
                func.coalesce(func.sum(spend), 0),
                func.coalesce(
                    func.sum(PointTransaction.points + PointTransaction.pending_points), 0
                ),
            )
            .select_from(PointTransaction)
            .outerjoin(PointBatch, PointBatch.id == PointTransaction.batch_id)
            .where(
                PointTransaction.member_id == member_id,
                PointTransaction.type == TxnType.EARN,
                ~fully_reversed,
            )
        )
        row = (await self.session.execute(query)).one()
        return OrderTotals(order_count=int(row[0]), spend=int(row[1]), earned_points=int(row[2]))
