"""What a search record holds: the rewards catalog's and the member directory's fields.

A reward is indexed while it is active (a retired reward's record is deleted); a member
only while not deleted and holding the consent the directory names, and then with only
the fields the directory lists. Nothing else about a member leaves memberhub this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from memberhub.integrations.providers.base import SearchRecord
from memberhub.members.models import Member
from memberhub.rewards.models import Reward
from memberhub.search.settings import MemberDirectory


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _timestamp(moment: datetime | None) -> int | None:
    # Numeric filters (valid_until_ts > now) need numbers, not dates.
    return int(moment.timestamp()) if moment is not None else None


def reward_record(reward: Reward) -> SearchRecord | None:
    """The reward's record; None when it has none (retired)."""
    if not reward.active:
        return None
    return SearchRecord(
        object_id=reward.public_id,
        attributes={
            "code": reward.code,
            "name": reward.name,
            "description": reward.description,
            "points_cost": reward.points_cost,
            "stock": reward.stock,
            "in_stock": reward.stock is None or reward.stock > 0,
            "per_member_limit": reward.per_member_limit,
            "tier_codes": [str(code) for code in reward.tier_codes.get("codes", [])],
            "valid_from": _iso(reward.valid_from),
            "valid_until": _iso(reward.valid_until),
            "valid_from_ts": _timestamp(reward.valid_from),
            "valid_until_ts": _timestamp(reward.valid_until),
        },
    )


def is_listed(member: Member, directory: MemberDirectory) -> bool:
    return member.deleted_at is None and bool(getattr(member, f"consent_{directory.consent}"))


def member_record(
    member: Member, directory: MemberDirectory, organisations: Mapping[int, str]
) -> SearchRecord | None:
    """The member's directory record; None when the member may not be listed."""
    if not is_listed(member, directory):
        return None
    values: dict[str, Any] = {
        "first_name": member.first_name,
        "last_name": member.last_name,
        "email": member.email,
        "phone": member.phone,
        "tier": member.tier,
        "status": member.status,
        "member_since": _iso(member.member_since),
        "organisation_id": organisations.get(member.organisation_id)
        if member.organisation_id is not None
        else None,
    }
    return SearchRecord(
        object_id=member.public_id, attributes={name: values[name] for name in directory.fields}
    )
