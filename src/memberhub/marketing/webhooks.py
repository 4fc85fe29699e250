"""What a marketing list's webhooks change in memberhub (applied by the inbound worker,
in the inbound event's transaction).

An unsubscribe or a cleaned address withdraws the member's email-marketing consent, with
the integration as the source of the change, and marks the contact so the sync never
writes it again: an unsubscribed contact is resubscribed only if the member gives consent
again in memberhub; a cleaned one never. Both apply to every member sharing the address
(in the integration's scope): the reader of that mailbox said no. A profile update carries
the names back to the member the list member is (the address's owner) only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth.principal import Principal
from memberhub.integrations.models import Integration
from memberhub.integrations.providers.base import AudienceChange
from memberhub.kit.actor import Actor
from memberhub.marketing.audience import PURPOSE
from memberhub.marketing.models import ContactStatus, MarketingContact
from memberhub.marketing.repository import MarketingRepository
from memberhub.members.consent import ConsentSource, set_consent
from memberhub.members.models import Member
from memberhub.members.repository import normalize_email
from memberhub.members.schemas import MemberPatch
from memberhub.members.service import update_member


def _principal(integration: Integration) -> Principal:
    return Principal.system(Actor.system(f"integration:{integration.public_id}"))


async def withdraw_marketing_consent(
    session: AsyncSession, integration: Integration, member: Member
) -> bool:
    """Turn the member's email-marketing consent off, the list's webhook being the source
    and the integration the actor; False when it was off already."""
    return await set_consent(
        session,
        Actor.system(f"integration:{integration.public_id}"),
        member,
        PURPOSE,
        False,
        source=ConsentSource.VENDOR_WEBHOOK,
    )


async def apply_audience_changes(
    session: AsyncSession,
    integration: Integration,
    changes: Sequence[AudienceChange],
    now: datetime,
) -> dict[str, Any]:
    repo = MarketingRepository(session)
    scope = await repo.scope(integration.organisation_id)
    withdrawn: list[str] = []
    updated: list[str] = []
    unknown: list[str] = []
    for change in changes:
        members = await _members(session, change.email, scope)
        if not members:
            unknown.append(change.email)
            continue
        if change.kind == "profile" and len(members) > 1:
            # The list member's names are its owner's, not those of others sharing it.
            members = await _owners(session, integration.id, change.email, members)
        for member in members:
            if change.kind in ("unsubscribed", "cleaned"):
                if await withdraw_marketing_consent(session, integration, member):
                    withdrawn.append(member.public_id)
                await _mark_contact(session, integration.id, member, change, now)
            elif change.kind == "profile":
                patch: dict[str, Any] = {}
                if change.first_name and change.first_name != member.first_name:
                    patch["first_name"] = change.first_name[:100]
                if change.last_name and change.last_name != member.last_name:
                    patch["last_name"] = change.last_name[:100]
                try:
                    profile = MemberPatch(**patch)
                except ValueError:
                    continue  # names memberhub would refuse from anyone: kept as they are
                if patch:
                    await update_member(
                        session,
                        _principal(integration),
                        member.public_id,
                        profile,
                        if_match=None,
                    )
                    updated.append(member.public_id)
    return {
        "action": "audience",
        "consent_withdrawn": withdrawn,
        "profiles_updated": updated,
        "unknown_addresses": len(unknown),
    }


async def _members(session: AsyncSession, email: str, scope: frozenset[int] | None) -> list[Member]:
    query = select(Member).where(
        Member.email_normalized == normalize_email(email), Member.deleted_at.is_(None)
    )
    if scope is not None:
        query = query.where(Member.organisation_id.in_(scope))
    return list(await session.scalars(query.order_by(Member.id)))


async def _owners(
    session: AsyncSession, integration_id: int, email: str, sharing: Sequence[Member]
) -> list[Member]:
    """Of the members sharing `email`, the one the list member is: the one the audience
    holds there (the address's owner, see `marketing/audience.py`); when it holds none of
    them, the only one, if only one has the address."""
    holders = set(
        await session.scalars(
            select(MarketingContact.member_id).where(
                MarketingContact.integration_id == integration_id,
                MarketingContact.member_id.in_([m.id for m in sharing]),
                MarketingContact.email == email.strip().lower(),
                MarketingContact.status == ContactStatus.SUBSCRIBED,
            )
        )
    )
    if not holders:
        return list(sharing) if len(sharing) == 1 else []
    return [m for m in sharing if m.id in holders]


async def _mark_contact(
    session: AsyncSession,
    integration_id: int,
    member: Member,
    change: AudienceChange,
    now: datetime,
) -> None:
    status = ContactStatus.CLEANED if change.kind == "cleaned" else ContactStatus.UNSUBSCRIBED
    contact = await session.scalar(
        select(MarketingContact).where(
            MarketingContact.integration_id == integration_id,
            MarketingContact.member_id == member.id,
        )
    )
    if contact is None:
        contact = MarketingContact(
            integration_id=integration_id, member_id=member.id, email=change.email.lower()
        )
        session.add(contact)
    contact.status = status
    # What the list holds now came from the list itself: nothing of ours matches it, and
    # nothing is written while the member has no consent.
    contact.content_hash = None
    contact.synced_at = now
