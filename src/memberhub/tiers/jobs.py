"""The tier review: the nightly pass that applies downgrade policies and ends floors.

Safe to run twice and from several workers at once. An account is reviewed at most once
per `REVIEW_INTERVAL`, decided under its row lock: a worker locks a chunk of due accounts
with SKIP LOCKED (another worker or a ledger operation holds the rest), and accounts it
skipped are retried at the end of the run with a waiting lock, by when whoever held them
has either reviewed them (they are no longer due) or let them go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import record_write
from memberhub.kit.actor import Actor
from memberhub.kit.db import Database
from memberhub.points.models import PointAccount
from memberhub.tiers import service
from memberhub.tiers.models import Tier
from memberhub.tiers.repository import TierRepository

SCHEDULER = Actor.system("system:scheduler")
CHUNK_ACCOUNTS = 1000
# Shorter than the job's day, so a late nightly run still finds yesterday's reviews due, and
# long enough that a repeated run (a worker restart, a second worker) steps nobody down twice.
REVIEW_INTERVAL = timedelta(hours=20)


@dataclass
class ChunkResult:
    locked: set[int] = field(default_factory=set)
    changed: int = 0


def _due(account: PointAccount, now: datetime) -> bool:
    reviewed = account.tier_reviewed_at
    return reviewed is None or reviewed <= now - REVIEW_INTERVAL


async def review_accounts(
    session: AsyncSession, now: datetime, member_ids: Sequence[int], *, skip_locked: bool
) -> ChunkResult:
    """Review the due accounts among `member_ids` that this transaction could lock."""
    repo = TierRepository(session)
    accounts = await repo.lock_accounts(member_ids, skip_locked=skip_locked)
    result = ChunkResult(locked={a.member_id for a in accounts})
    due = [a for a in accounts if _due(a, now)]
    if not due:
        return result
    ladder = await service.ladder(session)
    numbers = await service.standings(session, due, ladder.active, now)
    targets: list[tuple[PointAccount, Tier | None]] = []
    floors_ended = 0
    for account in due:
        if account.tier_floor_code is not None and not service.floor_holds(account, now):
            account.tier_floor_code = None
            account.tier_floor_until = None
            floors_ended += 1
        target = service.review_target(
            ladder,
            ladder.by_code(account.tier_code),
            service.qualifying_tier(ladder.active, numbers[account.member_id]),
            service.floor_in_force(ladder, account, now),
        )
        account.tier_reviewed_at = now
        if (target.code if target is not None else None) != account.tier_code:
            targets.append((account, target))
    if targets:
        members = await repo.member_refs([a.member_id for a, _ in targets])
        for account, target in targets:
            public_id, organisation_id = members[account.member_id]
            ref = service.MemberRef(account.member_id, public_id, organisation_id)
            await service.change_tier(
                session, account, ref, target, reason=service.TierChangeReason.REVIEW, now=now
            )
        result.changed = len(targets)
    await session.flush()
    if targets or floors_ended:
        record_write(
            session,
            SCHEDULER,
            action="tier.review",
            object_type="job",
            object_id="tiers.review",
            changes={
                "reviewed": len(due),
                "tier_changes": len(targets),
                "floors_ended": floors_ended,
            },
        )
    return result


async def run_review(db: Database, now: datetime, *, chunk_size: int = CHUNK_ACCOUNTS) -> int:
    """Review every due account, one transaction per chunk; returns the tier changes."""
    changed = 0
    skipped: list[int] = []
    after = 0
    while True:
        async with db.transaction() as session:
            tiers = await service.ladder(session)
            member_ids = await TierRepository(session).accounts_due_for_review(
                reviewed_before=now - REVIEW_INTERVAL,
                after_member_id=after,
                limit=chunk_size,
                # Without active tiers only members still holding a tier can change.
                tiered_only=not tiers.active,
            )
            if not member_ids:
                break
            result = await review_accounts(session, now, member_ids, skip_locked=True)
        after = member_ids[-1]
        changed += result.changed
        skipped.extend(m for m in member_ids if m not in result.locked)
    for start in range(0, len(skipped), chunk_size):
        async with db.transaction() as session:
            chunk = skipped[start : start + chunk_size]
            changed += (await review_accounts(session, now, chunk, skip_locked=False)).changed
    return changed
