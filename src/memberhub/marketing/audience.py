"""A member as the audience should hold them, and whether that differs from what was
last written.

Only members with email-marketing consent are subscribed. A member who is on the list
and no longer has it (withdrawn, deleted, moved out of the integration's organisations)
is written once more, as unsubscribed; a member who never had it is never written. An
address the vendor cleaned (bounces, abuse reports) is never written again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
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
    """One member to write: what to send and the hash to keep once it is accepted."""

    member_id: int
    member: AudienceMember
    content_hash: str


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


def plan_writes(
    settings: MarketingSyncSettings,
    member: Member,
    account: PointAccount | None,
    contact: MarketingContact | None,
    *,
    in_scope: bool,
    zone: tzinfo = UTC,
) -> list[Write]:
    """What to write for the member: nothing when the audience already holds it (or must
    never hear of them); two writes when a subscribed member's address changed, the old
    address unsubscribed before the new one is subscribed. A cleaned address (it bounced)
    is never written again; a member who has another one now is written at it."""
    email = (member.email or "").strip()
    if (
        contact is not None
        and contact.status == ContactStatus.CLEANED
        and contact.email == email.lower()
    ):
        return []
    wanted = in_scope and bool(email) and has_marketing_consent(member)
    on_list = contact is not None and contact.status == ContactStatus.SUBSCRIBED
    subscribed_at = contact.email if contact is not None and on_list else None
    if not wanted:
        if subscribed_at is None:
            return []
        # On the list and no longer wanted there: unsubscribed at the address written.
        return [_unsubscribe(member, subscribed_at)]
    audience = AudienceMember(
        key=member.public_id,
        email=email,
        status="subscribed",
        merge_fields=merge_fields(settings, member, account, zone),
        tags=member_tags(settings, member),
    )
    digest = content_hash(audience)
    if contact is not None and contact.content_hash == digest:
        return []
    writes = []
    if subscribed_at is not None and subscribed_at != email.lower():
        writes.append(_unsubscribe(member, subscribed_at))
    writes.append(Write(member.id, audience, digest))
    return writes


def _unsubscribe(member: Member, email: str) -> Write:
    audience = AudienceMember(
        key=member.public_id, email=email, status="unsubscribed", merge_fields={}, tags=()
    )
    return Write(member.id, audience, content_hash(audience))


def shown(member: AudienceMember) -> Mapping[str, Any]:
    """A write as a dry run shows it."""
    return {
        "member_id": member.key,
        "email_address": member.email,
        "status": member.status,
        "merge_fields": dict(member.merge_fields),
        "tags": list(member.tags),
    }
