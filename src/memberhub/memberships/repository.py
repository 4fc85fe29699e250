from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from memberhub.members.models import Member, MemberStatus
from memberhub.memberships.models import MembershipPlan, MembershipTerm, MemberStatusChange


class PlanRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_by_public_id(self, public_id: str) -> MembershipPlan | None:
        return await self.session.scalar(
            select(MembershipPlan).where(MembershipPlan.public_id == public_id)
        )

    async def get_by_code(self, code: str) -> MembershipPlan | None:
        return await self.session.scalar(select(MembershipPlan).where(MembershipPlan.code == code))

    async def list(
        self, *, visible_ids: frozenset[int] | None, after_id: int | None, limit: int
    ) -> Sequence[MembershipPlan]:
        query = select(MembershipPlan).order_by(MembershipPlan.id).limit(limit + 1)
        if visible_ids is not None:
            query = query.where(
                or_(
                    MembershipPlan.organisation_id.is_(None),
                    MembershipPlan.organisation_id.in_(visible_ids),
                )
            )
        if after_id is not None:
            query = query.where(MembershipPlan.id > after_id)
        return (await self.session.scalars(query)).all()


class TermRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def current(self, member_id: int, now: datetime) -> MembershipTerm | None:
        """The term running at `now`, else the latest one that started (never a term voided
        before it began, such as a prepaid renewal ended early)."""
        started = (
            select(MembershipTerm)
            .where(MembershipTerm.member_id == member_id, MembershipTerm.starts_at <= now)
            .where(
                or_(
                    MembershipTerm.ended_early_at.is_(None),
                    MembershipTerm.ended_early_at > MembershipTerm.starts_at,
                )
            )
            .order_by(MembershipTerm.starts_at.desc(), MembershipTerm.id.desc())
            .limit(1)
        )
        running = await self.session.scalar(
            started.where(MembershipTerm.ends_at > now).where(
                or_(MembershipTerm.ended_early_at.is_(None), MembershipTerm.ended_early_at > now)
            )
        )
        return running if running is not None else await self.session.scalar(started)

    async def run_start(self, member_id: int, ends_at: datetime) -> datetime | None:
        """When the run of back-to-back terms (each starting as the one before ends) that
        ends at `ends_at` began: the start of its first term. None when no term ends then."""
        terms = (
            await self.session.scalars(
                select(MembershipTerm).where(
                    MembershipTerm.member_id == member_id,
                    MembershipTerm.ended_early_at.is_(None),
                    MembershipTerm.ends_at <= ends_at,
                )
            )
        ).all()
        by_end = {term.ends_at: term for term in terms}
        start = None
        term = by_end.pop(ends_at, None)
        while term is not None:
            start = term.starts_at
            term = by_end.pop(term.starts_at, None)
        return start

    async def open_terms(self, member_id: int, now: datetime) -> Sequence[MembershipTerm]:
        """Terms not over at `now`: the running one and any future (prepaid) ones."""
        return (
            await self.session.scalars(
                select(MembershipTerm)
                .where(
                    MembershipTerm.member_id == member_id,
                    MembershipTerm.ends_at > now,
                    MembershipTerm.ended_early_at.is_(None),
                )
                .order_by(MembershipTerm.starts_at, MembershipTerm.id)
            )
        ).all()

    async def for_member(
        self, member_id: int, *, after_id: int | None, limit: int
    ) -> Sequence[MembershipTerm]:
        """Newest first, paged by id."""
        query = (
            select(MembershipTerm)
            .where(MembershipTerm.member_id == member_id)
            .order_by(MembershipTerm.id.desc())
            .limit(limit + 1)
        )
        if after_id is not None:
            query = query.where(MembershipTerm.id < after_id)
        return (await self.session.scalars(query)).all()

    async def plan_public_ids(self, plan_ids: set[int]) -> dict[int, str]:
        if not plan_ids:
            return {}
        rows = await self.session.execute(
            select(MembershipPlan.id, MembershipPlan.public_id).where(
                MembershipPlan.id.in_(plan_ids)
            )
        )
        return {row.id: row.public_id for row in rows}


class StatusHistoryRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def for_member(
        self, member_id: int, *, after_id: int | None, limit: int
    ) -> Sequence[MemberStatusChange]:
        query = (
            select(MemberStatusChange)
            .where(MemberStatusChange.member_id == member_id)
            .order_by(MemberStatusChange.id)
            .limit(limit + 1)
        )
        if after_id is not None:
            query = query.where(MemberStatusChange.id > after_id)
        return (await self.session.scalars(query)).all()


async def members_due_for_transition(
    session: AsyncSession, now: datetime, *, limit: int
) -> Sequence[Member]:
    """Active members past their term end, and grace members past their grace end or with a
    cancellation scheduled for the period end (which is already over).

    Rows are locked with SKIP LOCKED (on PostgreSQL), so several workers share the work.
    """
    query = (
        select(Member)
        .where(Member.deleted_at.is_(None))
        .where(
            or_(
                and_(Member.status == MemberStatus.ACTIVE, Member.term_ends_at <= now),
                and_(
                    Member.status == MemberStatus.GRACE,
                    or_(Member.grace_ends_at <= now, Member.cancel_at_period_end.is_(True)),
                ),
            )
        )
        .order_by(Member.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=Member)
        .options(selectinload(Member.organisation), selectinload(Member.plan))
    )
    return (await session.scalars(query)).all()
