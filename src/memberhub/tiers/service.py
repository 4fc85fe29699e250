"""Tiers: definitions, evaluation after each ledger change and at review, manual assignment."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.kit.actor import Actor
from memberhub.members.models import Member
from memberhub.points.models import PointAccount
from memberhub.tiers.models import Tier


async def earn_multiplier_percent(session: AsyncSession, tier_code: str | None) -> int:
    """The earn multiplier of the member's tier, in percent (100 without a tier)."""
    if tier_code is None:
        return 100
    percent = await session.scalar(
        select(Tier.earn_multiplier_percent).where(Tier.code == tier_code)
    )
    return int(percent) if percent is not None else 100


async def after_ledger_change(
    session: AsyncSession, actor: Actor, member: Member, account: PointAccount, now: datetime
) -> None:
    """Re-evaluate the member's tier after a ledger change (upgrades apply at once)."""
    # Implemented with the tier evaluation (tiers issue section).
    return None


@dataclass(frozen=True)
class TierProgress:
    tier: Tier | None
    projected: Tier | None
    next_tier: Tier | None
    points_to_next: int | None


async def tier_progress(
    session: AsyncSession, account: PointAccount | None, now: datetime
) -> TierProgress:
    """The member's tier, the tier a review would give now, and the distance to the next."""
    # Implemented with the tier evaluation (tiers issue section).
    return TierProgress(None, None, None, None)
