from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth.models import ApiKey


class ApiKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_by_prefix(self, prefix: str) -> ApiKey | None:
        return await self.session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))

    async def get_by_public_id(self, public_id: str) -> ApiKey | None:
        return await self.session.scalar(select(ApiKey).where(ApiKey.public_id == public_id))

    async def list_all(self) -> Sequence[ApiKey]:
        return (await self.session.scalars(select(ApiKey).order_by(ApiKey.id))).all()

    async def list(
        self, *, organisation_ids: frozenset[int] | None, after_id: int | None, limit: int
    ) -> Sequence[ApiKey]:
        query = select(ApiKey).order_by(ApiKey.id).limit(limit + 1)
        if after_id is not None:
            query = query.where(ApiKey.id > after_id)
        if organisation_ids is not None:
            query = query.where(ApiKey.organisation_id.in_(organisation_ids))
        return (await self.session.scalars(query)).all()

    async def any_active_admin(self) -> bool:
        found = await self.session.scalar(
            select(ApiKey.id)
            .where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None))
            .where(ApiKey.organisation_id.is_(None))
            .limit(1)
        )
        return found is not None
