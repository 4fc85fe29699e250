from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.models import Event


@dataclass(frozen=True)
class EventFilters:
    types: tuple[str, ...] = ()
    member_public_id: str | None = None
    organisation_ids: frozenset[int] | None = None
    occurred_from: datetime | None = None
    occurred_to: datetime | None = None


@dataclass(frozen=True)
class FeedEvent:
    """One sequenced event, as the feed's followers (search, marketing) read it."""

    position: int
    type: str
    member_public_id: str | None
    data: dict[str, Any]
    # The organisation the event belongs to (a member's, when it committed).
    organisation_id: int | None = None


class EventRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def latest_position(self) -> int:
        """The feed's latest position; 0 when nothing is sequenced yet."""
        return int(await self.session.scalar(select(func.max(Event.position))) or 0)

    async def feed_after(self, position: int, limit: int) -> list[FeedEvent]:
        """Up to `limit` sequenced events after `position`, in feed order."""
        rows = await self.session.execute(
            select(
                Event.position,
                Event.type,
                Event.member_public_id,
                Event.data,
                Event.organisation_id,
            )
            .where(Event.position > position)
            .order_by(Event.position)
            .limit(limit)
        )
        return [
            FeedEvent(
                position=int(row.position),
                type=row.type,
                member_public_id=row.member_public_id,
                data=row.data if isinstance(row.data, dict) else {},
                organisation_id=row.organisation_id,
            )
            for row in rows
        ]

    async def get_by_public_id(self, public_id: str) -> Event | None:
        return await self.session.scalar(select(Event).where(Event.public_id == public_id))

    async def list(
        self, filters: EventFilters, *, after_position: int | None, limit: int
    ) -> Sequence[Event]:
        """Events in commit order."""
        query = (
            select(Event)
            .where(Event.position.is_not(None))
            .order_by(Event.position)
            .limit(limit + 1)
        )
        if after_position is not None:
            query = query.where(Event.position > after_position)
        if filters.types:
            query = query.where(Event.type.in_(filters.types))
        if filters.member_public_id is not None:
            query = query.where(Event.member_public_id == filters.member_public_id)
        if filters.organisation_ids is not None:
            query = query.where(Event.organisation_id.in_(filters.organisation_ids))
        if filters.occurred_from is not None:
            query = query.where(Event.occurred_at >= filters.occurred_from)
        if filters.occurred_to is not None:
            query = query.where(Event.occurred_at < filters.occurred_to)
        return (await self.session.scalars(query)).all()

    async def for_member(self, member_public_id: str, types: tuple[str, ...]) -> Sequence[Event]:
        return (
            await self.session.scalars(
                select(Event)
                .where(Event.member_public_id == member_public_id, Event.type.in_(types))
                .order_by(Event.id)
            )
        ).all()
