from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.models import AuditEntry

_AUDIT_LOG = cast(Table, AuditEntry.__table__)
_RELINK = (
    update(_AUDIT_LOG)
    .where(_AUDIT_LOG.c.id == bindparam("b_id"))
    .values(prev_hash=bindparam("b_prev_hash"), hash=bindparam("b_hash"), seal=bindparam("b_seal"))
)


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

    async def head(self) -> tuple[int, str | None] | None:
        """The newest linked entry's position and hash; None for an empty chain."""
        row = (
            await self.session.execute(
                select(AuditEntry.chain_position, AuditEntry.hash)
                .where(AuditEntry.chain_position.is_not(None))
                .order_by(AuditEntry.chain_position.desc())
                .limit(1)
            )
        ).first()
        return (row[0] or 0, row[1]) if row is not None else None

    async def count_unkeyed(self) -> int:
        """Linked entries hashed before the chain was keyed (no seal)."""
        return int(
            await self.session.scalar(
                select(func.count())
                .select_from(AuditEntry)
                .where(AuditEntry.chain_position.is_not(None), AuditEntry.seal.is_(None))
            )
            or 0
        )

    async def relink(self, links: Sequence[dict[str, Any]]) -> None:
        """Rewrite entries' links: `b_id`, `b_prev_hash`, `b_hash`, `b_seal` each."""
        if links:
            await self.session.execute(
                _RELINK, list(links), execution_options={"synchronize_session": False}
            )
