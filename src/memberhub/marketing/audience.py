"""An address as the audience should hold it, and whether that differs from what was
last written.

Member emails are unique per organisation only, and the vendor keys its list members by
address (Mailchimp: the MD5 of the lower-cased address), so members of different
organisations may share one list member. Each address is therefore planned with every
member sharing it, and has at most one owner: the member with the lowest id among those
who have the address, are in the integration's scope and have email-marketing consent.
Only the owner is written (so shared members never overwrite each other), segmented and
sent journeys; when the owner withdraws, is deleted, leaves the scope or changes address,
the next such member becomes the owner and is written.

An address on the list that no member sharing it may be subscribed at any more is written
once more, as unsubscribed; a member who never had consent is never written. An address
the vendor cleaned (bounces, abuse reports) is never written again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, tzinfo
from typing import Any

from memberhub.integrations.providers.base import AudienceMember
from memberhub.marketing.models import ContactStatus, MarketingContact
from memberhub.marketing.settings import MarketingSyncSettings
from memberhub.members.consent import has_consent
from memberhub.members.models import Member
from memberhub.points.models import PointAccount

# The consent purpose the audience serves.
PURPOSE = "marketing_email"


def has_marketing_consent(member: Member) -> bool:
    """Whether the member agreed to marketing email (deleted members never have)."""
    return has_consent(member, PURPOSE)


@dataclass(frozen=True)
class Write:
    """One address to write: what to send and the hash to keep once it is accepted.

    `member_id` is the owner subscribed at the address, or the first member the audience
    held there when it is unsubscribed; `releases` are the other members whose contacts
    were subscribed at it: let go once a new owner is written, unsubscribed with the
    address otherwise."""

    member_id: int
    member: AudienceMember
    content_hash: str
    releases: tuple[int, ...] = ()


def merge_fields(
    settings: MarketingSyncSettings,
    member: Member,
    account: PointAccount | None,
    zone: tzinfo = UTC,
) -> dict[str, Any]:
    """The merge fields of a member; the term's end as the date it is in `zone` (the
    program's), as the member's own notifications name it."""
    tags = settings.merge_fields
    term_end = member.term_ends_at.astimezone(zone).date() if member.term_ends_at else None
    values: dict[str | None, Any] = {
        tags.first_name: member.first_name or "",
        tags.last_name: member.last_name or "",
        tags.tier: member.tier or "",
        tags.points_balance: account.current if account is not None else 0,
        tags.status: member.status,
        tags.term_end: term_end.isoformat() if term_end else "",
    }
    return {tag: value for tag, value in values.items() if tag}


def member_tags(settings: MarketingSyncSettings, member: Member) -> tuple[str, ...]:
    tags = [f"{settings.status_tag_prefix}{member.status}"]
    if member.tier:
        tags.append(f"{settings.tier_tag_prefix}{member.tier}")
    return tuple(sorted(tags))


def content_hash(member: AudienceMember) -> str:
    shape = {
        "email": member.email.lower(),
        "status": member.status,
        "merge_fields": dict(member.merge_fields),
        "tags": list(member.tags),
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode("utf-8")).hexdigest()


def address_of(member: Member) -> str | None:
    """The address the member is written at: lower-cased, as Mailchimp's id of a list
    member is the MD5 of the lower-cased address."""
    return (member.email or "").strip().lower() or None


@dataclass(frozen=True)
class Sharer:
    """A member planned with an address: one who has it now, or whose contact is (or was
    cleaned) at it."""

    member: Member
    account: PointAccount | None
    contact: MarketingContact | None
    in_scope: bool

    @property
    def holds(self) -> str | None:
        """The address the audience holds this member at (subscribed), if any."""
        contact = self.contact
        return contact.email if contact and contact.status == ContactStatus.SUBSCRIBED else None

    def addresses(self) -> set[str]:
        """Every address whose plan depends on this member."""
        found = {address_of(self.member), self.holds}
        if self.contact is not None and self.contact.status == ContactStatus.CLEANED:
            found.add(self.contact.email)
        return {a for a in found if a}

    def wants(self, address: str) -> bool:
        return (
            self.in_scope
            and address_of(self.member) == address
            and has_marketing_consent(self.member)
        )


def plan_address(
    settings: MarketingSyncSettings,
    address: str,
    sharers: Sequence[Sharer],
    *,
    zone: tzinfo = UTC,
) -> list[Write]:
    """What to write at one address, given every member sharing it (`Sharer.addresses`).

    The address has one owner: of the members who have it, are in the integration's scope
    and have consent, the one with the lowest id. Only the owner's content is written;
    the others are never written at it. A contact still subscribed at the address for
    anyone else (the owner before, who withdrew, was erased, left the scope or moved to
    another address) is released once the owner's write is accepted. Without an owner,
    the address is unsubscribed, once, if the audience holds it for anyone. An address
    the vendor cleaned for any of them is never written again."""
    if any(
        s.contact is not None
        and s.contact.status == ContactStatus.CLEANED
        and s.contact.email == address
        for s in sharers
    ):
        return []
    ordered = sorted(sharers, key=lambda s: s.member.id)
    holders = [s.member.id for s in ordered if s.holds == address]
    owner = next((s for s in ordered if s.wants(address)), None)
    if owner is None:
        if not holders:
            return []
        return [_unsubscribe(ordered, holders, address)]
    member = owner.member
    audience = AudienceMember(
        key=member.public_id,
        email=(member.email or "").strip(),
        status="subscribed",
        merge_fields=merge_fields(settings, member, owner.account, zone),
        tags=member_tags(settings, member),
    )
    digest = content_hash(audience)
    others = tuple(member_id for member_id in holders if member_id != member.id)
    # Unchanged, and nobody else's content may be what the list holds (as two members
    # written at one address before this rule may have left it).
    if not others and owner.contact is not None and owner.contact.content_hash == digest:
        return []
    return [Write(member.id, audience, digest, releases=others)]


def _unsubscribe(sharers: Sequence[Sharer], holders: Sequence[int], address: str) -> Write:
    first = next(s.member for s in sharers if s.member.id == holders[0])
    audience = AudienceMember(
        key=first.public_id, email=address, status="unsubscribed", merge_fields={}, tags=()
    )
    return Write(first.id, audience, content_hash(audience), releases=tuple(holders[1:]))


def shown(member: AudienceMember) -> Mapping[str, Any]:
    """A write as a dry run shows it."""
    return {
        "member_id": member.key,
        "email_address": member.email,
        "status": member.status,
        "merge_fields": dict(member.merge_fields),
        "tags": list(member.tags),
    }
