from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.models import AuditEntry


@dataclass(frozen=True)
class AuditFilters:
    actor: str | None = None
    action: str | None = None
    object_id: str | None = None
    occurred_from: datetime | None = None
    occurred_to: datetime | None = None


class AuditRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list(
        self, filters: AuditFilters, *, after_id: int | None, limit: int
    ) -> Sequence[AuditEntry]:
        query = select(AuditEntry).order_by(AuditEntry.id).limit(limit + 1)
        if after_id is not None:
            query = query.where(AuditEntry.id > after_id)
        if filters.actor is not None:
            query = query.where(AuditEntry.actor == filters.actor)
        if filters.action is not None:
            query = query.where(AuditEntry.action == filters.action)
        if filters.object_id is not None:
            query = query.where(AuditEntry.object_id == filters.object_id)
        if filters.occurred_from is not None:
            query = query.where(AuditEntry.occurred_at >= filters.occurred_from)
        if filters.occurred_to is not None:
            query = query.where(AuditEntry.occurred_at < filters.occurred_to)
        return (await self.session.scalars(query)).all()

    async def chunk_after(self, after_id: int, limit: int) -> Sequence[AuditEntry]:
        return (
            await self.session.scalars(
                select(AuditEntry)
                .where(AuditEntry.id > after_id)
                .order_by(AuditEntry.id)
                .limit(limit)
            )
        ).all()
