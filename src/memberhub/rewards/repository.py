from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Row, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.members.models import Member
from memberhub.rewards.models import ClaimStatus, Reward, RewardClaim
from memberhub.tiers.models import Tier


@dataclass(frozen=True)
class ClaimFilters:
    member_id: int | None = None
    reward_id: int | None = None
    status: str | None = None
    organisation_ids: frozenset[int] | None = None  # None = no restriction


class RewardRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # ------------------------------------------------------------ rewards

    async def get_by_public_id(self, public_id: str, *, for_update: bool = False) -> Reward | None:
        query = select(Reward).where(Reward.public_id == public_id)
        if for_update:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    async def code_taken(self, code: str) -> bool:
        return await self.session.scalar(select(Reward.id).where(Reward.code == code)) is not None

    async def lock(self, reward_id: int) -> Reward:
        """The reward row, re-read and locked until the transaction ends."""
        reward = await self.session.get(
            Reward, reward_id, with_for_update=True, populate_existing=True
        )
        assert reward is not None
        return reward

    async def list(
        self, *, active: bool | None, after_id: int | None, limit: int
    ) -> Sequence[Reward]:
        query = select(Reward).order_by(Reward.id).limit(limit + 1)
        if after_id is not None:
            query = query.where(Reward.id > after_id)
        if active is not None:
            query = query.where(Reward.active.is_(active))
        return (await self.session.scalars(query)).all()

    async def claimable_candidates(
        self, member_id: int, *, balance: int, now: datetime, after_id: int | None, chunk: int
    ) -> Sequence[Reward]:
        """Rewards the member could claim now, except for the tier restriction (a JSON list
        the caller checks): active, inside the validity window, in stock, affordable, and
        under the member's per-member limit."""
        held = (
            select(func.count(RewardClaim.id))
            .where(
                RewardClaim.reward_id == Reward.id,
                RewardClaim.member_id == member_id,
                RewardClaim.status == ClaimStatus.CLAIMED,
            )
            .scalar_subquery()
        )
        query = (
            select(Reward)
            .where(
                Reward.active.is_(True),
                or_(Reward.valid_from.is_(None), Reward.valid_from <= now),
                or_(Reward.valid_until.is_(None), Reward.valid_until > now),
                or_(Reward.stock.is_(None), Reward.stock > 0),
                Reward.points_cost <= balance,
                or_(Reward.per_member_limit.is_(None), held < Reward.per_member_limit),
            )
            .order_by(Reward.id)
            .limit(chunk)
        )
        if after_id is not None:
            query = query.where(Reward.id > after_id)
        return (await self.session.scalars(query)).all()

    async def claims_counts(self, reward_ids: Iterable[int]) -> dict[int, int]:
        """Claims that are not cancelled, per reward."""
        wanted = set(reward_ids)
        if not wanted:
            return {}
        rows = await self.session.execute(
            select(RewardClaim.reward_id, func.count(RewardClaim.id))
            .where(RewardClaim.reward_id.in_(wanted), RewardClaim.status == ClaimStatus.CLAIMED)
            .group_by(RewardClaim.reward_id)
        )
        return {row[0]: int(row[1]) for row in rows}

    async def known_tier_codes(self, codes: Iterable[str]) -> set[str]:
        wanted = set(codes)
        if not wanted:
            return set()
        # FOR SHARE: the tiers cannot be deleted until the reward naming them has committed
        # (a deletion checks for rewards limited to the tier after locking it).
        query = select(Tier.code).where(Tier.code.in_(wanted)).with_for_update(read=True)
        return set((await self.session.scalars(query)).all())

    # ------------------------------------------------------------ claims

    async def claim_by_public_id(self, public_id: str) -> RewardClaim | None:
        return await self.session.scalar(
            select(RewardClaim).where(RewardClaim.public_id == public_id)
        )

    async def claim_by_reference(self, scope: int, reference_id: str) -> RewardClaim | None:
        return await self.session.scalar(
            select(RewardClaim).where(
                RewardClaim.reference_scope == scope, RewardClaim.reference_id == reference_id
            )
        )

    async def lock_claim(self, claim_id: int) -> RewardClaim:
        claim = await self.session.get(
            RewardClaim, claim_id, with_for_update=True, populate_existing=True
        )
        assert claim is not None
        return claim

    async def count_held(self, reward_id: int, member_id: int) -> int:
        """The member's claims of this reward that are not cancelled."""
        count = await self.session.scalar(
            select(func.count(RewardClaim.id)).where(
                RewardClaim.reward_id == reward_id,
                RewardClaim.member_id == member_id,
                RewardClaim.status == ClaimStatus.CLAIMED,
            )
        )
        return int(count or 0)

    async def list_claims(
        self, filters: ClaimFilters, *, after_id: int | None, limit: int
    ) -> Sequence[Row[RewardClaim, str]]:
        """Newest first, paged by id, with each claim's member public id."""
        query = (
            select(RewardClaim, Member.public_id)
            .join(Member, Member.id == RewardClaim.member_id)
            .order_by(RewardClaim.id.desc())
            .limit(limit + 1)
        )
        if after_id is not None:
            query = query.where(RewardClaim.id < after_id)
        if filters.member_id is not None:
            query = query.where(RewardClaim.member_id == filters.member_id)
        if filters.reward_id is not None:
            query = query.where(RewardClaim.reward_id == filters.reward_id)
        if filters.status is not None:
            query = query.where(RewardClaim.status == filters.status)
        if filters.organisation_ids is not None:
            query = query.where(Member.organisation_id.in_(filters.organisation_ids))
        return (await self.session.execute(query)).all()

    async def rewards_by_id(self, ids: Iterable[int]) -> dict[int, Reward]:
        wanted = set(ids)
        if not wanted:
            return {}
        rows = await self.session.scalars(select(Reward).where(Reward.id.in_(wanted)))
        return {reward.id: reward for reward in rows}
