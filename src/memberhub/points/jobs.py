"""Scheduled ledger jobs: activation of pending points, expiry, expiring-points notices.

Each is safe to run twice and from several workers at once: a worker locks the accounts it
works on with SKIP LOCKED (another worker takes the others), and re-reads which batches are
due under that lock, so no batch is activated or expired twice. Expiry is set-based: a few
statements for a whole chunk of members, not a round trip per batch (`points/expiry.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.alerts import service as alerts
from memberhub.alerts.models import AlertType
from memberhub.audit.service import record_write
from memberhub.events.catalog import PointsEarned, PointsExpiring
from memberhub.events.service import emit
from memberhub.kit.clock import days_until
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points import expiry, service
from memberhub.points.models import BatchStatus, PointAccount, PointBatch, TxnType
from memberhub.points.repository import PointsRepository
from memberhub.program import service as program_service
from memberhub.tiers import service as tiers

SCHEDULER = expiry.SCHEDULER
# Members per chunk, one transaction each. On PostgreSQL a chunk locks only its members'
# accounts, so their own writes wait for at most one small chunk.
CHUNK_MEMBERS = 1000
# On SQLite every other writer waits for whichever chunk holds the write lock, so what counts
# is how long one takes (about half a second for this many members), and fewer, larger
# transactions spend much less on commits and WAL checkpoints.
SQLITE_EXPIRY_CHUNK_MEMBERS = 5000


async def _members(session: AsyncSession, member_ids: Sequence[int]) -> dict[int, Member]:
    rows = await session.scalars(select(Member).where(Member.id.in_(member_ids)))
    return {m.id: m for m in rows}


async def expire_chunk(
    session: AsyncSession, now: datetime, after_member_id: int
) -> tuple[int, int, int] | None:
    """Expire the due batches of the next chunk of members after `after_member_id`, and
    record one audit entry for the chunk (`points/expiry.py` says how, in a few statements
    for the whole chunk). Returns (last member id seen, batches expired, members affected),
    or None when no member has due batches left."""
    sqlite = session.get_bind().dialect.name == "sqlite"
    done = await expiry.expire_chunk(
        session,
        after_member_id=after_member_id,
        limit=SQLITE_EXPIRY_CHUNK_MEMBERS if sqlite else CHUNK_MEMBERS,
        now=now,
        actor_id=SCHEDULER.id,
    )
    if done is None:
        return None
    if done.members:
        record_write(
            session,
            SCHEDULER,
            action="points.expire",
            object_type="job",
            object_id="points.expire",
            changes={"members": done.members, "batches": done.batches, "points": done.points},
        )
    return done.last_member_id, done.batches, done.members


async def expire_points(db: Database, now: datetime) -> int:
    """Expire every batch whose expiry has passed, a chunk of members per transaction."""
    after = 0
    expired = 0
    while True:
        async with db.transaction() as session:
            done = await expire_chunk(session, now, after)
        if done is None:
            return expired
        after, batches, _members_count = done
        expired += batches


async def activate_pending_points(session: AsyncSession, now: datetime) -> int:
    """Make pending batches whose pending period is over spendable."""
    repo = PointsRepository(session)
    activated = 0
    after = 0
    while True:
        member_ids = await repo.members_with_due_batches(
            BatchStatus.PENDING, "activates_at", now, after, CHUNK_MEMBERS
        )
        if not member_ids:
            return activated
        after = member_ids[-1]
        # Members another worker holds are skipped; the next run takes them.
        accounts = await repo.lock_accounts_skip_locked(member_ids)
        members = await _members(session, [a.member_id for a in accounts])
        chunk_members = chunk_batches = chunk_points = 0
        for account in accounts:
            batches, points = await _activate_member(
                session, account, members[account.member_id], now
            )
            if batches:
                chunk_members += 1
                chunk_batches += batches
                chunk_points += points
        if chunk_members:
            # One audit entry for the chunk, as for expiry; each member's transaction and
            # event name the batches.
            record_write(
                session,
                SCHEDULER,
                action="points.activate",
                object_type="job",
                object_id="points.activate",
                changes={
                    "members": chunk_members,
                    "batches": chunk_batches,
                    "points": chunk_points,
                },
            )
        activated += chunk_batches


async def _activate_member(
    session: AsyncSession, account: PointAccount, member: Member, now: datetime
) -> tuple[int, int]:
    """Activate the member's due pending batches: (batches, points) activated."""
    batches = (
        await session.scalars(
            select(PointBatch)
            .where(
                PointBatch.member_id == account.member_id,
                PointBatch.status == BatchStatus.PENDING,
                PointBatch.activates_at <= now,
            )
            .order_by(PointBatch.id)
            .with_for_update()
        )
    ).all()
    if not batches:
        return 0, 0
    points = sum(b.remaining for b in batches)
    for batch in batches:
        batch.status = BatchStatus.ACTIVE if batch.remaining > 0 else BatchStatus.SPENT
    txn = service.record_transaction(
        session,
        account,
        SCHEDULER,
        now,
        TxnType.ACTIVATE,
        points=points,
        pending_points=-points,
        reason="Pending points became active",
        details={"batches": [b.public_id for b in batches]},
    )
    await session.flush()
    for batch in batches:
        await service.settle_into(session, txn, batch)
    emit(
        session,
        PointsEarned(**service.event_fields(txn, member)),
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
        occurred_at=now,
    )
    await tiers.after_ledger_change(session, SCHEDULER, member, account, now)
    return len(batches), points


async def notify_expiring_points(session: AsyncSession, now: datetime) -> int:
    """`points.expiring` once per batch, the program's notice period before it expires; and
    POINTS_EXPIRING once per batch of enough points, once it expires within the alert
    window (checked apart: the notice may go out before or after the batch enters it)."""
    program = await program_service.get_program(session)
    thresholds = program_service.alert_thresholds(program)
    horizon = now + timedelta(days=program.expiring_notice_days)
    repo = PointsRepository(session)
    batches = await repo.batches_due_notice(now, horizon, 5000)
    alerting = await repo.batches_due_expiring_alert(
        now,
        now + timedelta(days=thresholds.points_expiring_days),
        thresholds.points_expiring_min_points,
        5000,
    )
    if not batches and not alerting:
        return 0
    members = await _members(session, list({b.member_id for b in (*batches, *alerting)}))
    for batch in batches:
        assert batch.expires_at is not None
        batch.expiring_notified_at = now
        member = members[batch.member_id]
        emit(
            session,
            PointsExpiring(
                member_id=member.public_id,
                batch_id=batch.public_id,
                points=batch.remaining,
                expires_at=batch.expires_at,
                days_left=days_until(batch.expires_at, now),
            ),
            organisation_id=member.organisation_id,
            member_public_id=member.public_id,
            occurred_at=now,
        )
    for batch in alerting:
        assert batch.expires_at is not None
        batch.expiring_alerted_at = now
        member = members[batch.member_id]
        await alerts.raise_alert(
            session,
            AlertType.POINTS_EXPIRING,
            member=member,
            dedupe_key=(
                f"{AlertType.POINTS_EXPIRING}:{batch.public_id}:{batch.expires_at.isoformat()}"
            ),
            message=(
                f"{batch.remaining} points of {member.public_id} expire in "
                f"{days_until(batch.expires_at, now)} days."
            ),
            points=batch.remaining,
            data={"batch_id": batch.public_id, "expires_at": batch.expires_at.isoformat()},
            now=now,
        )
    await session.flush()
    return len(batches)
