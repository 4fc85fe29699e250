"""The member points summary (seed 004's CustomerPointsResponse)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.members.models import Member
from memberhub.points import service
from memberhub.points.repository import PointsRepository
from memberhub.points.schemas import PointsSummary, ScheduleItem, TierRef
from memberhub.program import service as program_service
from memberhub.tiers import service as tiers
from memberhub.tiers.models import Tier

RECENT_TRANSACTIONS = 10
EXPIRING_WINDOW = timedelta(days=30)


def _tier_ref(tier: Tier | None) -> TierRef | None:
    return TierRef(code=tier.code, name=tier.name) if tier is not None else None


async def points_summary(session: AsyncSession, member: Member, now: datetime) -> PointsSummary:
    repo = PointsRepository(session)
    account = await repo.get_account(member.id)
    program = await program_service.get_program(session)
    recent = await repo.recent_transactions(member.id, RECENT_TRANSACTIONS)
    progress = await tiers.tier_progress(session, account, now)
    current = account.current if account is not None else 0
    return PointsSummary(
        member_id=member.public_id,
        current_balance=current,
        pending_balance=account.pending if account is not None else 0,
        expiring_balance=await repo.expiring_between(member.id, now, now + EXPIRING_WINDOW),
        lifetime_earned=account.lifetime_earned if account is not None else 0,
        lifetime_redeemed=account.lifetime_redeemed if account is not None else 0,
        lifetime_expired=account.lifetime_expired if account is not None else 0,
        balance_value=program_service.points_value(program, max(current, 0)),
        currency=program.currency,
        recent_transactions=await service.transactions_out(
            session, [(t, member.public_id) for t in recent]
        ),
        expiration_schedule=[
            ScheduleItem(amount=amount, date=moment)
            for moment, amount in await repo.expiration_schedule(member.id)
        ],
        activation_schedule=[
            ScheduleItem(amount=amount, date=moment)
            for moment, amount in await repo.pending_schedule(member.id)
        ],
        tier=_tier_ref(progress.tier),
        projected_tier=_tier_ref(progress.projected),
        next_tier=_tier_ref(progress.next_tier),
        points_to_next_tier=progress.points_to_next,
        last_activity_at=account.last_activity_at if account is not None else None,
    )
