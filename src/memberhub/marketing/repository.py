"""The marketing sync's SQL: its state rows, the members and contacts it compares, the
segments' member queries and the journey firings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, delete, func, select, union
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.repository import EventRepository, FeedEvent
from memberhub.integrations.models import Integration
from memberhub.marketing.audience import PURPOSE
from memberhub.marketing.models import (
    ContactStatus,
    FiringStatus,
    JourneyFiring,
    MarketingContact,
    MarketingSegment,
    MarketingSyncState,
)
from memberhub.marketing.settings import SegmentConditions
from memberhub.members.consent import consent_column
from memberhub.members.models import Member
from memberhub.organisations.models import Organisation
from memberhub.organisations.repository import OrganisationRepository
from memberhub.points.models import BatchStatus, PointAccount, PointBatch
from memberhub.tiers.models import Tier


class MarketingRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def integrations(self, providers: Sequence[str]) -> list[Integration]:
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
    ) -> MarketingSyncState | None:
        query = select(MarketingSyncState).where(
            MarketingSyncState.integration_id == integration_id
        )
        if for_update:
            query = query.with_for_update()
        return await self.session.scalar(query)

    async def latest_position(self) -> int:
        return await EventRepository(self.session).latest_position()

    async def events_after(self, position: int, limit: int) -> list[FeedEvent]:
        return await EventRepository(self.session).feed_after(position, limit)

    async def scope(self, organisation_id: int | None) -> frozenset[int] | None:
        """The organisations an integration serves: its own and its chapters; None: all."""
        if organisation_id is None:
            return None
        return await OrganisationRepository(self.session).subtree_ids(organisation_id)

    async def member_ids(self, *, after_id: int, limit: int) -> list[int]:
        """Every member, deleted ones included (they may need unsubscribing), by id."""
        return list(
            await self.session.scalars(
                select(Member.id).where(Member.id > after_id).order_by(Member.id).limit(limit)
            )
        )

    async def member_ids_by_public_id(self, public_ids: Iterable[str]) -> dict[str, int]:
        wanted = list(public_ids)
        if not wanted:
            return {}
        rows = await self.session.execute(
            select(Member.public_id, Member.id).where(Member.public_id.in_(wanted))
        )
        return {public_id: member_id for public_id, member_id in rows}

    async def members_with_accounts(
        self, ids: Sequence[int]
    ) -> list[tuple[Member, PointAccount | None]]:
        if not ids:
            return []
        rows = await self.session.execute(
            select(Member, PointAccount)
            .outerjoin(PointAccount, PointAccount.member_id == Member.id)
            .where(Member.id.in_(ids))
            .order_by(Member.id)
        )
        return [(member, account) for member, account in rows]

    async def contacts(
        self, integration_id: int, member_ids: Sequence[int]
    ) -> dict[int, MarketingContact]:
        if not member_ids:
            return {}
        rows = await self.session.scalars(
            select(MarketingContact).where(
                MarketingContact.integration_id == integration_id,
                MarketingContact.member_id.in_(member_ids),
            )
        )
        return {contact.member_id: contact for contact in rows}

    async def members_sharing(self, integration_id: int, addresses: Iterable[str]) -> set[int]:
        """The members who have one of the (lower-cased) addresses, or whose contact with
        the integration is at one of them."""
        wanted = sorted(set(addresses))
        if not wanted:
            return set()
        query = union(
            select(Member.id).where(Member.email_normalized.in_(wanted)),
            select(MarketingContact.member_id).where(
                MarketingContact.integration_id == integration_id,
                MarketingContact.email.in_(wanted),
            ),
        )
        return {int(member_id) for member_id in await self.session.scalars(query)}

    async def contacts_by_email(self, integration_id: int, email: str) -> list[MarketingContact]:
        return list(
            await self.session.scalars(
                select(MarketingContact).where(
                    MarketingContact.integration_id == integration_id,
                    MarketingContact.email == email.strip().lower(),
                )
            )
        )

    async def forget_audience(self, integration_id: int) -> None:
        """Drop what was written to the previous audience: its contacts and segments."""
        for model in (MarketingContact, MarketingSegment):
            await self.session.execute(delete(model).where(model.integration_id == integration_id))

    async def contact_counts(self, integration_id: int) -> dict[str, int]:
        rows = await self.session.execute(
            select(MarketingContact.status, func.count())
            .where(MarketingContact.integration_id == integration_id)
            .group_by(MarketingContact.status)
        )
        return {status: int(count) for status, count in rows}

    # ------------------------------------------------------------ segments

    async def segment_rows(self, integration_id: int) -> dict[str, MarketingSegment]:
        rows = await self.session.scalars(
            select(MarketingSegment).where(MarketingSegment.integration_id == integration_id)
        )
        return {row.key: row for row in rows}

    async def segment_emails(
        self, integration_id: int, conditions: SegmentConditions, now: datetime
    ) -> set[str]:
        """The addresses on the audience (subscribed) of the members the conditions hold
        for, as the database has them now."""
        query = await self.segment_query(conditions, now)
        query = query.join(
            MarketingContact,
            and_(
                MarketingContact.member_id == Member.id,
                MarketingContact.integration_id == integration_id,
                MarketingContact.status == ContactStatus.SUBSCRIBED,
            ),
        ).with_only_columns(MarketingContact.email)
        return set(await self.session.scalars(query))

    async def segment_query(self, conditions: SegmentConditions, now: datetime) -> Select[Any]:
        """Members (not deleted, with email-marketing consent) the conditions hold for."""
        balance = func.coalesce(PointAccount.current, 0)
        clauses: list[ColumnElement[bool]] = [
            Member.deleted_at.is_(None),
            consent_column(PURPOSE).is_(True),
        ]
        if conditions.tiers is not None:
            clauses.append(Member.tier.in_(conditions.tiers))
        if conditions.statuses is not None:
            clauses.append(Member.status.in_(conditions.statuses))
        if conditions.points_min is not None:
            clauses.append(balance >= conditions.points_min)
        if conditions.points_max is not None:
            clauses.append(balance <= conditions.points_max)
        if conditions.inactive_days is not None:
            last_seen = func.coalesce(
                PointAccount.last_activity_at, Member.member_since, Member.created_at
            )
            clauses.append(last_seen <= now - timedelta(days=conditions.inactive_days))
        if conditions.organisation_ids is not None:
            organisations = OrganisationRepository(self.session)
            ids: set[int] = set()
            for public_id in conditions.organisation_ids:
                organisation = await self.session.scalar(
                    select(Organisation).where(Organisation.public_id == public_id)
                )
                if organisation is not None:
                    ids |= await organisations.subtree_ids(organisation.id)
            clauses.append(Member.organisation_id.in_(ids))
        return (
            select(Member.id)
            .outerjoin(PointAccount, PointAccount.member_id == Member.id)
            .where(*clauses)
        )

    # ------------------------------------------------------------ journeys

    async def tier_ranks(self) -> dict[str, int]:
        rows = await self.session.execute(select(Tier.code, Tier.rank))
        return {code.lower(): int(rank) for code, rank in rows}

    async def points_expiring(self, member_id: int, *, now: datetime, within_days: int) -> int:
        total = await self.session.scalar(
            select(func.coalesce(func.sum(PointBatch.remaining), 0)).where(
                PointBatch.member_id == member_id,
                PointBatch.status == BatchStatus.ACTIVE,
                PointBatch.remaining > 0,
                PointBatch.expires_at.is_not(None),
                PointBatch.expires_at > now,
                PointBatch.expires_at <= now + timedelta(days=within_days),
            )
        )
        return int(total or 0)

    async def fired(
        self, integration_id: int, pairs: Iterable[tuple[str, int]]
    ) -> set[tuple[str, int]]:
        """Which (rule, member) pairs already have a firing."""
        wanted = set(pairs)
        if not wanted:
            return set()
        rows = await self.session.execute(
            select(JourneyFiring.rule_key, JourneyFiring.member_id).where(
                JourneyFiring.integration_id == integration_id,
                JourneyFiring.member_id.in_({member_id for _, member_id in wanted}),
            )
        )
        return {(rule, member_id) for rule, member_id in rows} & wanted

    async def pending_firings(self, integration_id: int, limit: int) -> list[JourneyFiring]:
        return list(
            await self.session.scalars(
                select(JourneyFiring)
                .where(
                    JourneyFiring.integration_id == integration_id,
                    JourneyFiring.status == FiringStatus.PENDING,
                )
                .order_by(JourneyFiring.id)
                .limit(limit)
            )
        )

    async def firing_counts(self, integration_id: int) -> dict[str, int]:
        rows = await self.session.execute(
            select(JourneyFiring.status, func.count())
            .where(JourneyFiring.integration_id == integration_id)
            .group_by(JourneyFiring.status)
        )
        return {status: int(count) for status, count in rows}
