from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.staff.models import StaffUser


class StaffRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_by_public_id(self, public_id: str) -> StaffUser | None:
        return await self.session.scalar(select(StaffUser).where(StaffUser.public_id == public_id))

    async def get_by_email(self, email: str, *, for_update: bool = False) -> StaffUser | None:
        """`for_update` locks the row (and reloads it) until the transaction ends: sign-in
        attempts on one account then count one after another, none lost to a race."""
        query = select(StaffUser).where(StaffUser.email == email.strip().lower())
        if for_update:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    async def list(
        self, *, organisation_ids: frozenset[int] | None, after_id: int | None, limit: int
    ) -> Sequence[StaffUser]:
        query = select(StaffUser).order_by(StaffUser.id).limit(limit + 1)
        if after_id is not None:
            query = query.where(StaffUser.id > after_id)
        if organisation_ids is not None:
            query = query.where(StaffUser.organisation_id.in_(organisation_ids))
        return (await self.session.scalars(query)).all()
