"""The search sync's SQL: its state rows, the event feed it reads, and the rewards and
members it indexes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.models import Event
from memberhub.integrations.models import Integration
from memberhub.members.models import Member
from memberhub.organisations.repository import OrganisationRepository
from memberhub.rewards.models import Reward
from memberhub.search.models import SearchSyncState


@dataclass(frozen=True)
class FeedEvent:
    position: int
    type: str
    member_public_id: str | None
    data: dict[str, Any]


class SearchRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def integrations(self, providers: Sequence[str]) -> list[Integration]:
        """Enabled integrations of the given providers, by id."""
        if not providers:
            return []
        return list(
            await self.session.scalars(
                select(Integration)
                .where(Integration.enabled.is_(True), Integration.provider.in_(providers))
                .order_by(Integration.id)
            )
        )

    async def state(
        self, integration_id: int, *, for_update: bool = False
    ) -> SearchSyncState | None:
        return await self.session.get(
            SearchSyncState,
            integration_id,
            with_for_update=for_update,
            populate_existing=for_update,
        )

    async def latest_position(self) -> int:
        return int(await self.session.scalar(select(func.max(Event.position))) or 0)

    async def events_after(self, position: int, limit: int) -> list[FeedEvent]:
        rows = await self.session.execute(
            select(Event.position, Event.type, Event.member_public_id, Event.data)
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
            )
            for row in rows
        ]

    async def rewards_by_public_id(self, public_ids: Sequence[str]) -> dict[str, Reward]:
        if not public_ids:
            return {}
        rows = await self.session.scalars(select(Reward).where(Reward.public_id.in_(public_ids)))
        return {reward.public_id: reward for reward in rows}

    async def active_rewards(self, *, after_id: int, limit: int) -> list[Reward]:
        return list(
            await self.session.scalars(
                select(Reward)
                .where(Reward.active.is_(True), Reward.id > after_id)
                .order_by(Reward.id)
                .limit(limit)
            )
        )

    async def members_by_public_id(self, public_ids: Sequence[str]) -> dict[str, Member]:
        if not public_ids:
            return {}
        rows = await self.session.scalars(select(Member).where(Member.public_id.in_(public_ids)))
        return {member.public_id: member for member in rows}

    async def listed_members(self, consent: str, *, after_id: int, limit: int) -> list[Member]:
        """Members the directory may list: not deleted, with the named consent given."""
        consent_column = getattr(Member, f"consent_{consent}")
        return list(
            await self.session.scalars(
                select(Member)
                .where(Member.deleted_at.is_(None), consent_column.is_(True), Member.id > after_id)
                .order_by(Member.id)
                .limit(limit)
            )
        )

    async def organisation_public_ids(self, ids: set[int]) -> dict[int, str]:
        return await OrganisationRepository(self.session).public_ids(ids)
