from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.alerts.models import Alert
from memberhub.members.models import Member


@dataclass(frozen=True)
class AlertFilters:
    # None = every alert; otherwise only alerts of members in these organisations.
    organisation_ids: frozenset[int] | None = None
    type: str | None = None
    status: str | None = None
    priority: str | None = None
    member_id: int | None = None


class AlertRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list(
        self, filters: AlertFilters, *, after_id: int | None, limit: int
    ) -> Sequence[Row[Alert, str | None]]:
        """Newest first, paged by id, with each alert's member public id (None for a
        system-wide alert)."""
        query = (
            select(Alert, Member.public_id)
            .outerjoin(Member, Member.id == Alert.member_id)
            .order_by(Alert.id.desc())
            .limit(limit + 1)
        )
        if filters.organisation_ids is not None:
            # Also leaves out system-wide alerts: they have no member, so no organisation.
            query = query.where(Member.organisation_id.in_(filters.organisation_ids))
        if after_id is not None:
            query = query.where(Alert.id < after_id)
        if filters.type is not None:
            query = query.where(Alert.type == filters.type)
        if filters.status is not None:
            query = query.where(Alert.status == filters.status)
        if filters.priority is not None:
            query = query.where(Alert.priority == filters.priority)
        if filters.member_id is not None:
            query = query.where(Alert.member_id == filters.member_id)
        return (await self.session.execute(query)).all()

    async def get_by_public_id(self, public_id: str, *, for_update: bool = False) -> Alert | None:
        query = select(Alert).where(Alert.public_id == public_id)
        if for_update:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)
