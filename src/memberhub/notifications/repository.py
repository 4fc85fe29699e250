from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Row, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.integrations.models import Integration
from memberhub.members.models import Member
from memberhub.notifications.models import (
    DeviceToken,
    Notification,
    NotificationTemplate,
    Suppression,
)


@dataclass(frozen=True)
class NotificationFilters:
    # None = every notification; otherwise only those of these organisations' members.
    organisation_ids: frozenset[int] | None = None
    member_id: int | None = None
    status: str | None = None
    channel: str | None = None
    message_type: str | None = None
    event_public_id: str | None = None


NotificationRow = Row[Notification, str | None, str | None]


class NotificationRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list(
        self, filters: NotificationFilters, *, after_id: int | None, limit: int
    ) -> Sequence[NotificationRow]:
        """Newest first, paged by id, with the member's and the integration's public ids."""
        query = (
            select(Notification, Member.public_id, Integration.public_id)
            .outerjoin(Member, Member.id == Notification.member_id)
            .outerjoin(Integration, Integration.id == Notification.integration_id)
            .order_by(Notification.id.desc())
            .limit(limit + 1)
        )
        if filters.organisation_ids is not None:
            # Members' notifications only: those to staff (whose list is the
            # installation's) carry the organisation of the event, not of a member.
            query = query.where(
                Notification.organisation_id.in_(filters.organisation_ids),
                Notification.audience == "member",
            )
        if after_id is not None:
            query = query.where(Notification.id < after_id)
        if filters.member_id is not None:
            query = query.where(Notification.member_id == filters.member_id)
        if filters.status is not None:
            query = query.where(Notification.status == filters.status)
        if filters.channel is not None:
            query = query.where(Notification.channel == filters.channel)
        if filters.message_type is not None:
            query = query.where(Notification.message_type == filters.message_type)
        if filters.event_public_id is not None:
            query = query.where(Notification.event_public_id == filters.event_public_id)
        return (await self.session.execute(query)).all()

    async def by_reference_or_message_id(
        self, integration_id: int, reference: str | None, provider_message_id: str | None
    ) -> Notification | None:
        # Only the integration a notification went through reports on it.
        if reference:
            found = await self.session.scalar(
                select(Notification)
                .where(
                    Notification.public_id == reference,
                    Notification.integration_id == integration_id,
                )
                .with_for_update()
            )
            if found is not None:
                return found
        if provider_message_id:
            return await self.session.scalar(
                select(Notification)
                .where(
                    Notification.provider_message_id == provider_message_id,
                    Notification.integration_id == integration_id,
                )
                .with_for_update()
            )
        return None

    async def templates(self) -> Sequence[NotificationTemplate]:
        return (
            await self.session.scalars(
                select(NotificationTemplate).order_by(
                    NotificationTemplate.message_type,
                    NotificationTemplate.channel,
                    NotificationTemplate.locale,
                )
            )
        ).all()

    async def template(self, public_id: str) -> NotificationTemplate | None:
        return await self.session.scalar(
            select(NotificationTemplate).where(NotificationTemplate.public_id == public_id)
        )

    async def template_for(
        self, message_type: str, channel: str, locale: str
    ) -> NotificationTemplate | None:
        return await self.session.scalar(
            select(NotificationTemplate)
            .where(
                NotificationTemplate.message_type == message_type,
                NotificationTemplate.channel == channel,
                # Tags compare case aside (BCP 47): pt-BR and pt-br are one locale.
                func.lower(NotificationTemplate.locale) == locale.lower(),
            )
            .limit(1)
        )

    async def devices(self, member_id: int) -> Sequence[DeviceToken]:
        return (
            await self.session.scalars(
                select(DeviceToken)
                .where(DeviceToken.member_id == member_id)
                .order_by(DeviceToken.id)
            )
        ).all()

    async def suppression(self, channel: str, address: str) -> Suppression | None:
        return await self.session.scalar(
            select(Suppression).where(
                Suppression.channel == channel, Suppression.address == address
            )
        )

    async def suppressions(
        self, *, channel: str | None, after_id: int | None, limit: int
    ) -> Sequence[Suppression]:
        query = select(Suppression).order_by(Suppression.id.desc()).limit(limit + 1)
        if channel is not None:
            query = query.where(Suppression.channel == channel)
        if after_id is not None:
            query = query.where(Suppression.id < after_id)
        return (await self.session.scalars(query)).all()

    async def suppressed_addresses(self, channel: str, addresses: set[str]) -> dict[str, str]:
        """Of `addresses`, those suppressed on the channel, with why."""
        if not addresses:
            return {}
        rows = await self.session.execute(
            select(Suppression.address, Suppression.reason).where(
                Suppression.channel == channel, Suppression.address.in_(addresses)
            )
        )
        return {address: reason for address, reason in rows}
