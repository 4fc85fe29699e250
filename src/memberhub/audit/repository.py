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
        self, filters: AuditFilters, *, after_position: int | None, limit: int
    ) -> Sequence[AuditEntry]:
        """Entries in chain order (those the sequencer has linked)."""
        query = (
            select(AuditEntry)
            .where(AuditEntry.chain_position.is_not(None))
            .order_by(AuditEntry.chain_position)
            .limit(limit + 1)
        )
        if after_position is not None:
            query = query.where(AuditEntry.chain_position > after_position)
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

    async def chain_after(self, after_position: int, limit: int) -> Sequence[AuditEntry]:
        return (
            await self.session.scalars(
                select(AuditEntry)
                .where(AuditEntry.chain_position > after_position)
                .order_by(AuditEntry.chain_position)
                .limit(limit)
            )
        ).all()
