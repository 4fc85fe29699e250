"""The rewards catalog, claims and their cancellation.

A claim redeems the reward's points and takes one unit of stock in one transaction. Locks
are always taken in the same order, so concurrent claims neither oversell nor deadlock:
the claim's reference (when it has one), then the member's point account, then the claim
row (cancellation only), then the reward row. The account lock serialises one member's
claims, which keeps the per-member limit exact; the reward row lock serialises the stock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.events.catalog import (
    RewardClaimCancelled,
    RewardClaimed,
    RewardCreated,
    RewardUpdated,
)
from memberhub.events.service import emit
from memberhub.kit.clock import utcnow
from memberhub.kit.db import named_xact_lock
from memberhub.kit.errors import Conflict, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from memberhub.members.service import get_member
from memberhub.points import service as points
from memberhub.points.models import PointAccount, PointTransaction, TxnType
from memberhub.points.repository import PointsRepository
from memberhub.rewards.models import ClaimStatus, Reward, RewardClaim
from memberhub.rewards.repository import RewardRepository
from memberhub.rewards.schemas import (
    MAX_COUNT,
    ClaimOut,
    RewardCreate,
    RewardOut,
    RewardPatch,
)

# Rewards read per query while filtering the catalog by the member's tier in Python.
_AVAILABLE_CHUNK = 200


class RewardNotFound(NotFound):
    code = "REWARD_NOT_FOUND"
    default_message = "The reward does not exist."


class ClaimNotFound(NotFound):
    code = "CLAIM_NOT_FOUND"
    default_message = "The reward claim does not exist."


class DuplicateRewardCode(Conflict):
    code = "DUPLICATE_REWARD_CODE"
    default_message = "A reward with this code exists."


class RewardNotAvailable(Conflict):
    code = "REWARD_NOT_AVAILABLE"
    default_message = "The reward cannot be claimed now."


class TierNotEligible(Conflict):
    code = "TIER_NOT_ELIGIBLE"
    default_message = "The member's tier may not claim this reward."


class ClaimLimitReached(Conflict):
    code = "CLAIM_LIMIT_REACHED"
    default_message = "The member holds as many claims of this reward as allowed."


class OutOfStock(Conflict):
    code = "OUT_OF_STOCK"
    default_message = "The reward is out of stock."


class ClaimAlreadyCancelled(Conflict):
    code = "CLAIM_ALREADY_CANCELLED"
    default_message = "The claim is already cancelled."


@dataclass
class ClaimOutcome:
    claim: RewardClaim
    reward: Reward
    member: Member
    account: PointAccount
    replayed: bool = False


# ---------------------------------------------------------------- catalog


def tier_codes_of(reward: Reward) -> list[str]:
    return [str(code) for code in reward.tier_codes.get("codes", [])]


def _snapshot(reward: Reward) -> dict[str, Any]:
    return {
        "code": reward.code,
        "name": reward.name,
        "description": reward.description,
        "points_cost": reward.points_cost,
        "stock": reward.stock,
        "per_member_limit": reward.per_member_limit,
        "tier_codes": tier_codes_of(reward),
        "valid_from": reward.valid_from,
        "valid_until": reward.valid_until,
        "active": reward.active,
    }


async def rewards_to_out(session: AsyncSession, rewards: Sequence[Reward]) -> list[RewardOut]:
    counts = await RewardRepository(session).claims_counts(r.id for r in rewards)
    return [
        RewardOut(
            id=r.public_id,
            claims_count=counts.get(r.id, 0),
            created_at=r.created_at,
            updated_at=r.updated_at,
            **_snapshot(r),
        )
        for r in rewards
    ]


async def get_reward(session: AsyncSession, public_id: str) -> Reward:
    reward = await RewardRepository(session).get_by_public_id(public_id)
    if reward is None:
        raise RewardNotFound(f"Reward {public_id} does not exist.")
    return reward


async def _checked_tier_codes(session: AsyncSession, codes: Sequence[str]) -> list[str]:
    wanted = list(dict.fromkeys(codes))
    unknown = sorted(set(wanted) - await RewardRepository(session).known_tier_codes(wanted))
    if unknown:
        raise ValidationFailed(
            "Unknown tier codes.",
            code="UNKNOWN_TIER_CODES",
            details={"unknown_tier_codes": unknown},
        )
    return wanted


async def create_reward(
    session: AsyncSession, principal: Principal, payload: RewardCreate
) -> Reward:
    principal.require_installation_wide("Rewards")
    tier_codes = await _checked_tier_codes(session, payload.tier_codes)
    repo = RewardRepository(session)
    duplicate = DuplicateRewardCode(
        f"A reward with code '{payload.code}' exists.", details={"field": "code"}
    )
    if await repo.code_taken(payload.code):
        raise duplicate
    now = utcnow()
    reward = Reward(
        public_id=new_public_id("rwd"),
        **payload.model_dump(exclude={"tier_codes"}),
        tier_codes={"codes": tier_codes},
        created_at=now,
        updated_at=now,
    )
    try:
        # A concurrent create of the same code commits first: report it as the duplicate.
        async with session.begin_nested():
            session.add(reward)
            await session.flush()
    except IntegrityError as exc:
        raise duplicate from exc
    record_write(
        session,
        principal.actor,
        action="reward.create",
        object_type="reward",
        object_id=reward.public_id,
        changes=diff({}, _snapshot(reward)),
    )
    emit(
        session,
        RewardCreated(
            reward_id=reward.public_id,
            code=reward.code,
            name=reward.name,
            points_cost=reward.points_cost,
            active=reward.active,
        ),
        occurred_at=now,
    )
    return reward


async def update_reward(
    session: AsyncSession, principal: Principal, public_id: str, payload: RewardPatch
) -> Reward:
    principal.require_installation_wide("Rewards")
    # Locked, so a new absolute stock cannot interleave with a claim taking a unit.
    reward = await RewardRepository(session).get_by_public_id(public_id, for_update=True)
    if reward is None:
        raise RewardNotFound(f"Reward {public_id} does not exist.")
    changes = payload.model_dump(exclude_unset=True)
    if "tier_codes" in changes:
        changes["tier_codes"] = {"codes": await _checked_tier_codes(session, changes["tier_codes"])}
    valid_from = changes.get("valid_from", reward.valid_from)
    valid_until = changes.get("valid_until", reward.valid_until)
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        raise ValidationFailed(
            "valid_until must be later than valid_from.",
            details={
                "valid_from": valid_from.isoformat(),
                "valid_until": valid_until.isoformat(),
            },
        )
    before = _snapshot(reward)
    for field, value in changes.items():
        setattr(reward, field, value)
    changed = diff(before, _snapshot(reward))
    if changed:
        reward.updated_at = utcnow()
        await session.flush()
        record_write(
            session,
            principal.actor,
            action="reward.update",
            object_type="reward",
            object_id=reward.public_id,
            changes=changed,
        )
        emit(
            session,
            RewardUpdated(
                reward_id=reward.public_id,
                code=reward.code,
                name=reward.name,
                points_cost=reward.points_cost,
                active=reward.active,
                changed=sorted(changed),
            ),
            occurred_at=reward.updated_at,
        )
    return reward


async def claimable_rewards(
    session: AsyncSession, member: Member, *, now: datetime, after_id: int | None, limit: int
) -> list[Reward]:
    """Up to `limit + 1` rewards the member could claim now, by id: active, inside the
    validity window, in stock, affordable from the current balance, under the per-member
    limit, and open to the member's tier."""
    account = await PointsRepository(session).get_account(member.id)
    balance = account.current if account is not None else 0
    tier_code = account.tier_code if account is not None else None
    repo = RewardRepository(session)
    found: list[Reward] = []
    while len(found) <= limit:
        chunk = await repo.claimable_candidates(
            member.id, balance=balance, now=now, after_id=after_id, chunk=_AVAILABLE_CHUNK
        )
        for reward in chunk:
            codes = tier_codes_of(reward)
            if not codes or tier_code in codes:
                found.append(reward)
                if len(found) > limit:
                    break
        if len(chunk) < _AVAILABLE_CHUNK:
            break
        after_id = chunk[-1].id
    return found


# ---------------------------------------------------------------- claims


async def _lock_claim_reference(session: AsyncSession, scope: int, reference_id: str) -> None:
    """Serialise claims carrying the same reference in one organisation until the first
    commits, so a repeat finds the first claim (on SQLite the write lock already does this)."""
    await session.run_sync(named_xact_lock, f"rewards:claim:{scope}:{reference_id}")


def _check_available(reward: Reward, now: datetime) -> None:
    if not reward.active:
        raise RewardNotAvailable(
            f"Reward {reward.code} is not active.", details={"reason": "inactive"}
        )
    if reward.valid_from is not None and now < reward.valid_from:
        raise RewardNotAvailable(
            f"Reward {reward.code} can be claimed from {reward.valid_from.isoformat()}.",
            details={"reason": "not_yet_valid", "valid_from": reward.valid_from.isoformat()},
        )
    if reward.valid_until is not None and now >= reward.valid_until:
        raise RewardNotAvailable(
            f"Reward {reward.code} could be claimed until {reward.valid_until.isoformat()}.",
            details={"reason": "expired", "valid_until": reward.valid_until.isoformat()},
        )


async def claim_reward(
    session: AsyncSession,
    principal: Principal,
    reward_public_id: str,
    member_public_id: str,
    *,
    reference_id: str | None,
    now: datetime | None = None,
) -> ClaimOutcome:
    """Redeem the reward's points and take one unit of stock. With a `reference_id` the
    claim applies once in the member's organisation: a repeat returns the first claim."""
    now = now or utcnow()
    repo = RewardRepository(session)
    reward = await get_reward(session, reward_public_id)
    member = await get_member(session, principal, member_public_id)
    scope = points.reference_scope(member)
    if reference_id is not None:
        await _lock_claim_reference(session, scope, reference_id)
    account = await PointsRepository(session).lock_account(member.id)
    if reference_id is not None:
        earlier = await repo.claim_by_reference(scope, reference_id)
        if earlier is not None:
            if earlier.reward_id != reward.id or earlier.member_id != member.id:
                # Only the member's own claim is named: another member's may be one the
                # caller does not see.
                details = {"reference_id": reference_id}
                if earlier.member_id == member.id:
                    details["claim_id"] = earlier.public_id
                raise points.ReferenceReused(
                    f"reference_id '{reference_id}' was used for another claim.",
                    details=details,
                )
            return ClaimOutcome(earlier, reward, member, account, replayed=True)
    reward = await repo.lock(reward.id)
    _check_available(reward, now)
    eligible_tiers = tier_codes_of(reward)
    if eligible_tiers and account.tier_code not in eligible_tiers:
        raise TierNotEligible(
            f"Reward {reward.code} is for members of tiers {', '.join(eligible_tiers)}.",
            details={"tier_code": account.tier_code, "eligible_tier_codes": eligible_tiers},
        )
    if reward.per_member_limit is not None:
        held = await repo.count_held(reward.id, member.id)
        if held >= reward.per_member_limit:
            raise ClaimLimitReached(
                f"The member already holds {held} claims of reward {reward.code}.",
                details={"per_member_limit": reward.per_member_limit, "claims": held},
            )
    if reward.stock is not None and reward.stock <= 0:
        raise OutOfStock(f"Reward {reward.code} is out of stock.", details={"stock": 0})
    claim_id = new_public_id("clm")
    redeemed = await points.spend_points(
        session,
        principal.actor,
        member,
        TxnType.REDEEM,
        points=reward.points_cost,
        reason=f"Reward {reward.code}",
        # The claim's own id: the client's reference belongs to the claim, and the ledger
        # keeps its own references apart from it.
        reference_id=claim_id,
        now=now,
        details={"reward_id": reward.public_id, "claim_id": claim_id},
    )
    stock_before = reward.stock
    if reward.stock is not None:
        reward.stock -= 1
    claim = RewardClaim(
        public_id=claim_id,
        reward_id=reward.id,
        member_id=member.id,
        status=ClaimStatus.CLAIMED,
        points=reward.points_cost,
        reference_id=reference_id,
        reference_scope=scope if reference_id is not None else None,
        transaction_id=redeemed.transaction.id,
        claimed_at=now,
    )
    session.add(claim)
    await session.flush()
    emit(
        session,
        RewardClaimed(
            member_id=member.public_id,
            reward_id=reward.public_id,
            reward_code=reward.code,
            claim_id=claim.public_id,
            points=claim.points,
            transaction_id=redeemed.transaction.public_id,
            occurred_at=now,
        ),
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
        occurred_at=now,
    )
    record_write(
        session,
        principal.actor,
        action="reward.claim",
        object_type="reward_claim",
        object_id=claim.public_id,
        changes={
            "reward_id": reward.public_id,
            "member_id": member.public_id,
            "points": claim.points,
            "transaction_id": redeemed.transaction.public_id,
            "reference_id": reference_id,
            "stock": {"before": stock_before, "after": reward.stock},
        },
    )
    return ClaimOutcome(claim, reward, member, redeemed.account)


async def _visible_claim(
    session: AsyncSession, principal: Principal, public_id: str
) -> tuple[RewardClaim, Member]:
    claim = await RewardRepository(session).claim_by_public_id(public_id)
    owner = await session.get(Member, claim.member_id) if claim is not None else None
    if (
        claim is None
        or owner is None
        or owner.deleted_at is not None
        or not principal.can_see_organisation(owner.organisation_id)
    ):
        raise ClaimNotFound(f"Claim {public_id} does not exist.")
    return claim, await get_member(session, principal, owner.public_id)


async def cancel_claim(
    session: AsyncSession,
    principal: Principal,
    claim_public_id: str,
    *,
    reason: str,
    now: datetime | None = None,
) -> ClaimOutcome:
    """Refund the claim's points into batches with the expiries they had, give the unit of
    stock back and mark the claim cancelled."""
    now = now or utcnow()
    repo = RewardRepository(session)
    claim, member = await _visible_claim(session, principal, claim_public_id)
    await PointsRepository(session).lock_account(member.id)
    claim = await repo.lock_claim(claim.id)
    if claim.status == ClaimStatus.CANCELLED:
        raise ClaimAlreadyCancelled(
            f"Claim {claim.public_id} was cancelled already.",
            details={
                "cancelled_at": claim.cancelled_at.isoformat() if claim.cancelled_at else None
            },
        )
    redemption = await session.get(PointTransaction, claim.transaction_id)
    assert redemption is not None
    refunded = await points.refund_redemption(
        session, principal.actor, member, redemption, reason=reason, now=now
    )
    reward = await repo.lock(claim.reward_id)
    stock_before = reward.stock
    if reward.stock is not None:
        # Never past the most a reward can hold (staff may have set the stock to it since).
        reward.stock = min(reward.stock + 1, MAX_COUNT)
    claim.status = ClaimStatus.CANCELLED
    claim.cancelled_at = now
    claim.cancel_reason = reason
    claim.refund_transaction_id = refunded.transaction.id
    await session.flush()
    emit(
        session,
        RewardClaimCancelled(
            member_id=member.public_id,
            reward_id=reward.public_id,
            claim_id=claim.public_id,
            points=claim.points,
            transaction_id=refunded.transaction.public_id,
            occurred_at=now,
        ),
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
        occurred_at=now,
    )
    record_write(
        session,
        principal.actor,
        action="reward.claim.cancel",
        object_type="reward_claim",
        object_id=claim.public_id,
        changes={
            "status": {"before": ClaimStatus.CLAIMED, "after": ClaimStatus.CANCELLED},
            "reason": reason,
            "refund_transaction_id": refunded.transaction.public_id,
            "points": claim.points,
            "stock": {"before": stock_before, "after": reward.stock},
        },
    )
    return ClaimOutcome(claim, reward, member, refunded.account)


# ---------------------------------------------------------------- output


async def claims_to_out(
    session: AsyncSession, rows: Sequence[tuple[RewardClaim, str]]
) -> list[ClaimOut]:
    """Claims with the public ids of their reward, member and transactions."""
    claims = [claim for claim, _ in rows]
    rewards = await RewardRepository(session).rewards_by_id(c.reward_id for c in claims)
    txn_ids = [c.transaction_id for c in claims]
    txn_ids += [c.refund_transaction_id for c in claims if c.refund_transaction_id is not None]
    transactions = await PointsRepository(session).public_ids(txn_ids)
    return [
        ClaimOut(
            id=claim.public_id,
            reward_id=rewards[claim.reward_id].public_id,
            reward_code=rewards[claim.reward_id].code,
            member_id=member_public_id,
            status=claim.status,
            points=claim.points,
            reference_id=claim.reference_id,
            transaction_id=transactions[claim.transaction_id],
            refund_transaction_id=transactions[claim.refund_transaction_id]
            if claim.refund_transaction_id is not None
            else None,
            claimed_at=claim.claimed_at,
            cancelled_at=claim.cancelled_at,
            cancel_reason=claim.cancel_reason,
        )
        for claim, member_public_id in rows
    ]
