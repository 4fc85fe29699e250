from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Table, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from memberhub.kit.cache import detached
from memberhub.members.models import Member
from memberhub.points.models import PointAccount, PointBatch, PointTransaction, TxnType
from memberhub.rewards.models import Reward
from memberhub.tiers.models import Tier

# Transactions whose `points` made earned points spendable: earns and awards credited at
# once, reversals (negative), and activations of pending earns (not transfers: they earn
# nothing). Their sum over all time is `lifetime_earned - pending`.
ACTIVE_EARNED_TYPES = (
    TxnType.EARN,
    TxnType.AWARD,
    TxnType.REVERSE,
    TxnType.ACTIVATE,
)


class TierRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # ------------------------------------------------------------ definitions

    async def all_by_rank(self) -> Sequence[Tier]:
        return (await self.session.scalars(select(Tier).order_by(Tier.rank))).all()

    async def all_by_rank_detached(self) -> list[Tier]:
        """Every tier by rank, as instances belonging to no session (for caching)."""
        table = Tier.__table__
        assert isinstance(table, Table)
        rows = await self.session.execute(select(table).order_by(table.c.rank))
        return [detached(Tier, row) for row in rows]

    async def get_by_public_id(self, public_id: str, *, for_update: bool = False) -> Tier | None:
        query = select(Tier).where(Tier.public_id == public_id)
        if for_update:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    async def get_by_code(self, code: str, *, hold: bool = False) -> Tier | None:
        """The tier; with `hold`, kept from deletion until this transaction ends (see
        `hold`)."""
        query = select(Tier).where(Tier.code == code)
        if hold:
            query = query.with_for_update(read=True, key_share=True)
        return await self.session.scalar(query)

    async def hold(self, code: str) -> bool:
        """Whether the tier still exists, kept so until this transaction ends: a deletion
        (which locks the tier, then checks nobody holds it) waits for it and then sees the
        member in the tier, or went first and is seen here as the tier being gone (FOR KEY
        SHARE; SQLite's single writer needs no lock)."""
        query = select(Tier.id).where(Tier.code == code).with_for_update(read=True, key_share=True)
        return await self.session.scalar(query) is not None

    async def rank_taken(self, rank: int, *, exclude_id: int | None = None) -> bool:
        query = select(Tier.id).where(Tier.rank == rank)
        if exclude_id is not None:
            query = query.where(Tier.id != exclude_id)
        return await self.session.scalar(query.limit(1)) is not None

    async def list_by_rank(
        self, *, active: bool | None, after_rank: int | None, limit: int
    ) -> Sequence[Tier]:
        query = select(Tier).order_by(Tier.rank).limit(limit + 1)
        if active is not None:
            query = query.where(Tier.active.is_(active))
        if after_rank is not None:
            query = query.where(Tier.rank > after_rank)
        return (await self.session.scalars(query)).all()

    async def is_held(self, code: str) -> bool:
        """Whether any member holds the tier, or has it as a floor."""
        held = await self.session.scalar(
            select(PointAccount.member_id)
            .where(or_(PointAccount.tier_code == code, PointAccount.tier_floor_code == code))
            .limit(1)
        )
        return held is not None

    async def rewards_limited_to(self, code: str) -> list[str]:
        """The codes of the rewards whose `tier_codes` name the tier (a short catalogue,
        read whole: the codes are kept as JSON)."""
        rewards = await self.session.execute(
            select(Reward.code, Reward.tier_codes).order_by(Reward.code)
        )
        return [
            reward_code
            for reward_code, tier_codes in rewards
            if code in (tier_codes or {}).get("codes", [])
        ]

    # ------------------------------------------------------------ members' standing

    async def active_earned_since(
        self, member_ids: Sequence[int], since: datetime
    ) -> dict[int, int]:
        """Earned points that became active at or after `since`, per member. A reversal
        takes back only what the window counted: one of an earn whose points became active
        before it does not. A pending earn's points became active with its activation (its
        batch's `activates_at`, which the activation job follows within a tick), not when
        it was earned: so an earn from before the window, activated inside it and then
        refunded, counts for nothing."""
        reversed_earn = aliased(PointTransaction)
        earn_activated = (
            select(func.max(PointBatch.activates_at))
            .where(PointBatch.transaction_id == reversed_earn.id)
            .scalar_subquery()
        )
        rows = await self.session.execute(
            select(PointTransaction.member_id, func.sum(PointTransaction.points))
            .outerjoin(reversed_earn, reversed_earn.id == PointTransaction.related_transaction_id)
            .where(
                PointTransaction.member_id.in_(member_ids),
                PointTransaction.type.in_(ACTIVE_EARNED_TYPES),
                PointTransaction.occurred_at >= since,
                or_(
                    PointTransaction.type != TxnType.REVERSE,
                    func.coalesce(earn_activated, reversed_earn.occurred_at) >= since,
                ),
            )
            .group_by(PointTransaction.member_id)
        )
        return {row[0]: int(row[1] or 0) for row in rows}

    # ------------------------------------------------------------ review

    async def accounts_due_for_review(
        self,
        *,
        reviewed_before: datetime,
        after_member_id: int,
        limit: int,
        tiered_only: bool,
    ) -> list[int]:
        """Member ids, ascending, of accounts not reviewed since `reviewed_before`."""
        query = (
            select(PointAccount.member_id)
            .join(Member, Member.id == PointAccount.member_id)
            .where(
                Member.deleted_at.is_(None),
                PointAccount.member_id > after_member_id,
                or_(
                    PointAccount.tier_reviewed_at.is_(None),
                    PointAccount.tier_reviewed_at <= reviewed_before,
                ),
            )
            .order_by(PointAccount.member_id)
            .limit(limit)
        )
        if tiered_only:
            query = query.where(
                or_(PointAccount.tier_code.is_not(None), PointAccount.tier_floor_code.is_not(None))
            )
        return list((await self.session.scalars(query)).all())

    async def lock_accounts(
        self, member_ids: Sequence[int], *, skip_locked: bool
    ) -> list[PointAccount]:
        """Lock the accounts in member id order; with `skip_locked`, only those nobody else
        holds (another transaction has the rest)."""
        # With their members' rows, as every points change locks them (points/repository.py).
        query = (
            select(PointAccount)
            .join(Member, Member.id == PointAccount.member_id)
            .where(PointAccount.member_id.in_(member_ids))
            .order_by(PointAccount.member_id)
            .with_for_update(of=(Member, PointAccount), key_share=True, skip_locked=skip_locked)
            .execution_options(populate_existing=True)
        )
        return list((await self.session.scalars(query)).all())

    async def member_refs(self, member_ids: Sequence[int]) -> dict[int, tuple[str, int | None]]:
        """Member id -> (public id, organisation id)."""
        rows = await self.session.execute(
            select(Member.id, Member.public_id, Member.organisation_id).where(
                Member.id.in_(member_ids)
            )
        )
        return {row[0]: (row[1], row[2]) for row in rows}

    async def set_member_tier(self, member_id: int, code: str | None, now: datetime) -> int:
        """Show the tier on the member row; returns the member's new version.

        A plain UPDATE bumps the version whatever it is now, so a tier change never fails
        because someone edited the member's profile meanwhile.
        """
        version = await self.session.scalar(
            update(Member)
            .where(Member.id == member_id)
            .values(tier=code, version=Member.version + 1, updated_at=now)
            .returning(Member.version)
            .execution_options(synchronize_session=False)
        )
        assert version is not None
        return int(version)
