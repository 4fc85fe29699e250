"""The search sync's SQL: its state rows, the event feed it reads, and the rewards and
members it indexes."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.models import Event
from memberhub.events.repository import EventRepository, FeedEvent
from memberhub.integrations.models import Integration
from memberhub.members.models import Member
from memberhub.organisations.repository import OrganisationRepository
from memberhub.rewards.models import Reward
from memberhub.search.models import SearchSyncState


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
        return await EventRepository(self.session).latest_position()

    async def events_after(self, position: int, limit: int) -> list[FeedEvent]:
        return await EventRepository(self.session).feed_after(position, limit)

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

    async def listed_members(
        self,
        consent: str,
        *,
        after_id: int,
        limit: int,
        organisation_ids: frozenset[int] | None,
    ) -> list[Member]:
        """Members the directory may list: not deleted, with the named consent given, in
        `organisation_ids` (None: any)."""
        consent_column = getattr(Member, f"consent_{consent}")
        query = (
            select(Member)
            .where(Member.deleted_at.is_(None), consent_column.is_(True), Member.id > after_id)
            .order_by(Member.id)
            .limit(limit)
        )
        if organisation_ids is not None:
            query = query.where(Member.organisation_id.in_(organisation_ids))
        return list(await self.session.scalars(query))

    async def scope(self, organisation_id: int | None) -> frozenset[int] | None:
        """The organisations an integration serves: its own and its chapters; None: all."""
        if organisation_id is None:
            return None
        return await OrganisationRepository(self.session).subtree_ids(organisation_id)

    async def organisation_before(
        self, member_public_id: str, position: int
    ) -> tuple[bool, int | None]:
        """The organisation of the member's last event before `position`: (found, id);
        not found when no earlier event is kept."""
        row = (
            await self.session.execute(
                select(Event.organisation_id)
                .where(Event.member_public_id == member_public_id, Event.position < position)
                .order_by(Event.position.desc())
                .limit(1)
            )
        ).first()
        return (False, None) if row is None else (True, row[0])

    async def organisation_public_ids(self, ids: set[int]) -> dict[int, str]:
        return await OrganisationRepository(self.session).public_ids(ids)
