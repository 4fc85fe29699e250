"""Tiers: definitions, evaluation after each ledger change and at review, manual assignment.

A member's tier is the account's `tier_code`, mirrored on `members.tier`. Each tier measures
its own basis: earned points that became active (lifetime), earned points that became active
in a rolling window, or the current balance. The qualifying tier is the highest-ranked
active tier whose threshold the member meets. Ledger changes only ever upgrade; the review
applies the current tier's downgrade policy. A floor set by a manual assignment keeps the
member at least at that tier until it ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.events.catalog import MemberTierChanged
from memberhub.events.service import emit
from memberhub.kit.actor import Actor
from memberhub.kit.cache import ProcessCache
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from memberhub.points.models import PointAccount
from memberhub.points.repository import PointsRepository
from memberhub.tiers.models import DowngradePolicy, Tier, TierBasis
from memberhub.tiers.repository import TierRepository
from memberhub.tiers.schemas import (
    TierAssignment,
    TierAssignmentOut,
    TierCreate,
    TierOut,
    TierPatch,
    check_window,
)


class TierChangeReason:
    EARNED = "earned"
    REVIEW = "review"
    ASSIGNED = "assigned"


# ---------------------------------------------------------------- the tier ladder

_CACHE_KEY = "memberhub.tiers"


@dataclass(frozen=True)
class Ladder:
    """Every tier, by ascending rank. Only active tiers are awarded; a member may still
    hold a tier deactivated since."""

    tiers: tuple[Tier, ...]

    @property
    def active(self) -> tuple[Tier, ...]:
        return tuple(t for t in self.tiers if t.active)

    def by_code(self, code: str | None) -> Tier | None:
        if code is None:
            return None
        return next((t for t in self.tiers if t.code == code), None)

    def active_above(self, tier: Tier | None) -> tuple[Tier, ...]:
        return tuple(t for t in self.active if t.rank > _rank(tier))

    def next_above(self, tier: Tier | None) -> Tier | None:
        above = self.active_above(tier)
        return above[0] if above else None

    def next_below(self, tier: Tier) -> Tier | None:
        below = [t for t in self.active if t.rank < tier.rank]
        return below[-1] if below else None


def _rank(tier: Tier | None) -> int:
    return -1 if tier is None else tier.rank


_LADDER_CACHE: ProcessCache[str, tuple[Tier, ...]] = ProcessCache("tiers", watches=(Tier,))


async def ladder(session: AsyncSession) -> Ladder:
    """The tiers (read-only), kept per process (`kit/cache.py`) and once per transaction:
    ledger operations ask on every change."""
    cached: tuple[Tier, ...] | None = session.info.get(_CACHE_KEY)
    if cached is None:

        async def load() -> tuple[Tier, ...]:
            return tuple(await TierRepository(session).all_by_rank_detached())

        cached = await _LADDER_CACHE.get_or_load(session, "ladder", load)
        session.info[_CACHE_KEY] = cached
    return Ladder(cached)


def _forget_tiers(session: AsyncSession) -> None:
    session.info.pop(_CACHE_KEY, None)


@event.listens_for(Session, "after_transaction_end")
def _forget_tiers_after_transaction(session: Session, transaction: SessionTransaction) -> None:
    # A rollback expires the cached rows and another transaction may have changed them; the
    # flushes inside one transaction (sub-transactions) keep the cache.
    if transaction.parent is None or transaction.nested:
        session.info.pop(_CACHE_KEY, None)


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Standing:
    """A member's numbers for each basis."""

    active_earned: int
    balance: int
    # window_days -> earned points that became active inside the window
    rolling: Mapping[int, int]

    def metric(self, tier: Tier) -> int:
        if tier.basis == TierBasis.CURRENT_BALANCE:
            return self.balance
        if tier.basis == TierBasis.ROLLING_EARNED:
            return self.rolling.get(tier.window_days or 0, 0)
        return self.active_earned


NO_STANDING = Standing(active_earned=0, balance=0, rolling={})


async def standings(
    session: AsyncSession, accounts: Sequence[PointAccount], tiers: Sequence[Tier], now: datetime
) -> dict[int, Standing]:
    """Each account's standing for `tiers`: one query per rolling window among them."""
    member_ids = [a.member_id for a in accounts]
    windows = {t.window_days for t in tiers if t.basis == TierBasis.ROLLING_EARNED}
    rolling: dict[int, dict[int, int]] = {}
    repo = TierRepository(session)
    for days in sorted(w for w in windows if w is not None):
        rolling[days] = await repo.active_earned_since(member_ids, now - timedelta(days=days))
    return {
        a.member_id: Standing(
            # Pending points count once they become active, so a refunded purchase whose
            # points never became active never lifts a tier.
            active_earned=a.lifetime_earned - a.pending,
            balance=a.current,
            rolling={days: totals.get(a.member_id, 0) for days, totals in rolling.items()},
        )
        for a in accounts
    }


def qualifying_tier(tiers: Sequence[Tier], standing: Standing) -> Tier | None:
    """The highest-ranked of `tiers` (ascending rank) whose threshold the member meets."""
    for tier in reversed(tiers):
        if standing.metric(tier) >= tier.threshold:
            return tier
    return None


def floor_in_force(ladder: Ladder, account: PointAccount | None, now: datetime) -> Tier | None:
    if account is None or not floor_holds(account, now):
        return None
    floor = ladder.by_code(account.tier_floor_code)
    return floor if floor is not None and floor.active else None


def floor_holds(account: PointAccount, now: datetime) -> bool:
    return account.tier_floor_code is not None and (
        account.tier_floor_until is None or account.tier_floor_until > now
    )


def review_target(
    ladder: Ladder, current: Tier | None, qualifying: Tier | None, floor: Tier | None
) -> Tier | None:
    """The tier a review gives: the qualifying tier when it is not lower; otherwise what the
    current tier's downgrade policy allows, never below the floor. A tier deactivated since
    the member reached it is left for the qualifying tier."""
    if current is None or not current.active or _rank(qualifying) >= current.rank:
        target = qualifying
    elif current.downgrade_policy == DowngradePolicy.NEVER:
        target = current
    elif current.downgrade_policy == DowngradePolicy.ONE_STEP:
        below = ladder.next_below(current)
        target = below if _rank(below) > _rank(qualifying) else qualifying
    else:
        target = qualifying
    if floor is not None and floor.rank > _rank(target):
        target = floor
    return target


@dataclass(frozen=True)
class MemberRef:
    id: int
    public_id: str
    organisation_id: int | None


async def change_tier(
    session: AsyncSession,
    account: PointAccount,
    member: MemberRef,
    tier: Tier | None,
    *,
    reason: str,
    now: datetime,
) -> bool:
    """Move the member to `tier`, mirror it on the member row and emit the event."""
    previous = account.tier_code
    code = tier.code if tier is not None else None
    if previous == code:
        return False
    if code is not None and not await TierRepository(session).hold(code):
        return False  # deleted since the ladder was read: the member stays where they are
    account.tier_code = code
    account.updated_at = now
    version = await TierRepository(session).set_member_tier(member.id, code, now)
    loaded = session.identity_map.get(identity_key(Member, member.id))
    if isinstance(loaded, Member):
        # Keep a member loaded in this session in step with its row, so a later change to it
        # passes the version check instead of failing as stale.
        set_committed_value(loaded, "tier", code)
        set_committed_value(loaded, "version", version)
        set_committed_value(loaded, "updated_at", now)
    emit(
        session,
        MemberTierChanged(
            member_id=member.public_id,
            previous_tier=previous,
            new_tier=code,
            reason=reason,
            occurred_at=now,
        ),
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
        occurred_at=now,
    )
    return True


async def earn_multiplier_percent(session: AsyncSession, tier_code: str | None) -> int:
    """The earn multiplier of the member's tier, in percent (100 without a tier)."""
    tier = (await ladder(session)).by_code(tier_code)
    return tier.earn_multiplier_percent if tier is not None else 100


async def after_ledger_change(
    session: AsyncSession, actor: Actor, member: Member, account: PointAccount, now: datetime
) -> None:
    """Re-evaluate the member's tier after a ledger change (upgrades apply at once).

    Downgrades wait for the review. Without tiers above the member's this reads nothing
    but the tier list, once per transaction.
    """
    tiers = await ladder(session)
    candidates = tiers.active_above(tiers.by_code(account.tier_code))
    if not candidates:
        return
    standing = (await standings(session, [account], candidates, now))[account.member_id]
    best = qualifying_tier(candidates, standing)
    if best is None:
        return
    previous = account.tier_code
    ref = MemberRef(member.id, member.public_id, member.organisation_id)
    await change_tier(session, account, ref, best, reason=TierChangeReason.EARNED, now=now)
    record_write(
        session,
        actor,
        action="tier.change",
        object_type="member",
        object_id=member.public_id,
        changes={
            "tier": {"before": previous, "after": best.code},
            "reason": TierChangeReason.EARNED,
        },
    )


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
    tiers = await ladder(session)
    current = tiers.by_code(account.tier_code) if account is not None else None
    if not tiers.active:
        return TierProgress(current, None, None, None)
    standing = (
        (await standings(session, [account], tiers.active, now))[account.member_id]
        if account is not None
        else NO_STANDING
    )
    projected = review_target(
        tiers,
        current,
        qualifying_tier(tiers.active, standing),
        floor_in_force(tiers, account, now),
    )
    next_tier = tiers.next_above(current)
    points_to_next = (
        max(0, next_tier.threshold - standing.metric(next_tier)) if next_tier is not None else None
    )
    return TierProgress(current, projected, next_tier, points_to_next)


# ---------------------------------------------------------------- definitions


def to_out(tier: Tier) -> TierOut:
    return TierOut(
        id=tier.public_id,
        created_at=tier.created_at,
        updated_at=tier.updated_at,
        **_snapshot(tier),
    )


def _snapshot(tier: Tier) -> dict[str, Any]:
    return {
        "code": tier.code,
        "name": tier.name,
        "rank": tier.rank,
        "threshold": tier.threshold,
        "basis": tier.basis,
        "window_days": tier.window_days,
        "downgrade_policy": tier.downgrade_policy,
        "earn_multiplier_percent": tier.earn_multiplier_percent,
        "benefits": list((tier.benefits or {}).get("items", [])),
        "active": tier.active,
    }


async def get_tier(session: AsyncSession, public_id: str, *, for_update: bool = False) -> Tier:
    tier = await TierRepository(session).get_by_public_id(public_id, for_update=for_update)
    if tier is None:
        raise NotFound(f"Tier {public_id} does not exist.", code="TIER_NOT_FOUND")
    return tier


async def _check_rank_free(session: AsyncSession, rank: int, exclude_id: int | None) -> None:
    if await TierRepository(session).rank_taken(rank, exclude_id=exclude_id):
        raise Conflict(
            f"Another tier has rank {rank}.", code="DUPLICATE_TIER_RANK", details={"rank": rank}
        )


async def create_tier(session: AsyncSession, principal: Principal, payload: TierCreate) -> Tier:
    principal.require_installation_wide("Tiers")
    if await TierRepository(session).get_by_code(payload.code) is not None:
        raise Conflict(
            f"A tier with code '{payload.code}' exists.",
            code="DUPLICATE_TIER_CODE",
            details={"code": payload.code},
        )
    await _check_rank_free(session, payload.rank, None)
    now = utcnow()
    tier = Tier(
        public_id=new_public_id("tir"),
        **payload.model_dump(exclude={"benefits"}),
        benefits={"items": list(payload.benefits)},
        created_at=now,
        updated_at=now,
    )
    session.add(tier)
    await session.flush()
    _forget_tiers(session)
    record_write(
        session,
        principal.actor,
        action="tier.create",
        object_type="tier",
        object_id=tier.public_id,
        changes=diff({}, _snapshot(tier)),
    )
    return tier


async def update_tier(
    session: AsyncSession, principal: Principal, public_id: str, payload: TierPatch
) -> Tier:
    principal.require_installation_wide("Tiers")
    tier = await get_tier(session, public_id)
    given = payload.model_dump(exclude_unset=True)
    # null means "unchanged", except for window_days, where it drops the window.
    values = {k: v for k, v in given.items() if v is not None or k == "window_days"}
    basis = values.get("basis", tier.basis)
    if "window_days" in values:
        window_days = values["window_days"]
    else:
        # Leaving the rolling basis drops its window.
        window_days = tier.window_days if basis == TierBasis.ROLLING_EARNED else None
    try:
        check_window(basis, window_days)
    except ValueError as exc:
        raise ValidationFailed(f"{exc}.", details={"field": "window_days"}) from exc
    values["window_days"] = window_days
    if "rank" in values and values["rank"] != tier.rank:
        await _check_rank_free(session, values["rank"], tier.id)
    if "benefits" in values:
        values["benefits"] = {"items": list(values["benefits"])}
    before = _snapshot(tier)
    for field, value in values.items():
        setattr(tier, field, value)
    changes = diff(before, _snapshot(tier))
    if changes:
        tier.updated_at = utcnow()
        await session.flush()
        _forget_tiers(session)
        record_write(
            session,
            principal.actor,
            action="tier.update",
            object_type="tier",
            object_id=tier.public_id,
            changes=changes,
        )
    return tier


async def delete_tier(session: AsyncSession, principal: Principal, public_id: str) -> None:
    """Delete a tier nobody holds; a tier members hold is deactivated instead."""
    principal.require_installation_wide("Tiers")
    # Locked: a reward being limited to it meanwhile (which reads its tiers FOR SHARE)
    # either commits first, and is seen below, or waits and finds the tier gone.
    tier = await get_tier(session, public_id, for_update=True)
    repo = TierRepository(session)
    if await repo.is_held(tier.code):
        raise Conflict(
            f"Members hold tier '{tier.code}' (or have it as a floor); deactivate it instead.",
            code="TIER_IN_USE",
            details={"code": tier.code},
        )
    rewards = await repo.rewards_limited_to(tier.code)
    if rewards:
        # Deleted, it would leave those rewards claimable by nobody, without a word.
        raise Conflict(
            f"Rewards limited to tier '{tier.code}' would be left claimable by nobody "
            f"({', '.join(rewards[:10])}): change their tier_codes first, or deactivate "
            "the tier.",
            code="TIER_IN_USE",
            details={"code": tier.code, "rewards": rewards[:100]},
        )
    before = _snapshot(tier)
    await session.delete(tier)
    await session.flush()
    _forget_tiers(session)
    record_write(
        session,
        principal.actor,
        action="tier.delete",
        object_type="tier",
        object_id=public_id,
        changes=diff(before, {}),
    )


# ---------------------------------------------------------------- manual assignment


def _assignment_snapshot(account: PointAccount) -> dict[str, Any]:
    return {
        "tier": account.tier_code,
        "floor_tier": account.tier_floor_code,
        "floor_until": account.tier_floor_until,
    }


async def assign_tier(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    payload: TierAssignment,
    *,
    now: datetime | None = None,
) -> TierAssignmentOut:
    """Set the member's tier now, up or down, with a floor: no review takes the member below
    it until `until` (or the next assignment). A null tier clears tier and floor."""
    now = now or utcnow()
    tier = None
    if payload.tier_code is not None:
        tier = await TierRepository(session).get_by_code(payload.tier_code, hold=True)
        if tier is None:
            raise NotFound(
                f"Tier '{payload.tier_code}' does not exist.",
                code="TIER_NOT_FOUND",
                details={"tier_code": payload.tier_code},
            )
        if not tier.active:
            raise Conflict(
                f"Tier '{tier.code}' is not active.",
                code="TIER_INACTIVE",
                details={"tier_code": tier.code},
            )
    if payload.until is not None:
        if tier is None:
            raise ValidationFailed(
                "until needs a tier_code: it is how long the tier is kept.",
                details={"field": "until"},
            )
        if payload.until <= now:
            raise ValidationFailed("until must be in the future.", details={"field": "until"})
    account = await PointsRepository(session).lock_account(member.id)
    before = _assignment_snapshot(account)
    account.tier_floor_code = tier.code if tier is not None else None
    account.tier_floor_until = payload.until if tier is not None else None
    account.updated_at = now
    ref = MemberRef(member.id, member.public_id, member.organisation_id)
    await change_tier(session, account, ref, tier, reason=TierChangeReason.ASSIGNED, now=now)
    await session.flush()
    after = _assignment_snapshot(account)
    record_write(
        session,
        actor,
        action="tier.assign",
        object_type="member",
        object_id=member.public_id,
        changes={**diff(before, after), "reason": payload.reason},
    )
    return TierAssignmentOut(
        member_id=member.public_id,
        previous_tier=before["tier"],
        tier=account.tier_code,
        floor_tier=account.tier_floor_code,
        floor_until=account.tier_floor_until,
    )
