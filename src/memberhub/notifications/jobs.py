"""Scheduled notification work: renewal reminders (daily), planning and sending (every
tick, declared by the worker with the settings and the hub they need)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.catalog import MembershipRenewalDue
from memberhub.events.service import emit
from memberhub.kit.clock import days_until
from memberhub.members.models import Member, MemberStatus
from memberhub.memberships.models import MembershipPlan
from memberhub.notifications import service
from memberhub.notifications.models import RenewalNotice
from memberhub.organisations.models import Organisation

RENEWAL_BATCH = 5000


async def announce_renewals_due(session: AsyncSession, now: datetime) -> int:
    """`membership.renewal_due` for each active member whose term ends within one of the
    notice periods (`renewal_due_days`), once per term end and period: the shortest period
    the term end is within, so a member who joins with five days left hears once, not once
    per period."""
    settings = await service.get_settings(session)
    periods = sorted(settings.renewal_due_days)
    if not periods:
        return 0
    count = 0
    after_id = 0
    # Every member due, a page at a time: the job runs once a day.
    while page := await _renewals_page(session, now, periods, after_id):
        count += await _announce(session, now, periods, page)
        after_id = page[-1][0].id
    return count


async def _renewals_page(
    session: AsyncSession, now: datetime, periods: list[int], after_id: int
) -> list[tuple[Member, str | None, str | None]]:
    rows = (
        await session.execute(
            select(Member, MembershipPlan.public_id, Organisation.public_id)
            .outerjoin(MembershipPlan, MembershipPlan.id == Member.plan_id)
            .outerjoin(Organisation, Organisation.id == Member.organisation_id)
            .where(
                Member.status == MemberStatus.ACTIVE,
                Member.deleted_at.is_(None),
                Member.cancel_at_period_end.is_(False),
                Member.term_ends_at > now,
                Member.term_ends_at <= now + timedelta(days=periods[-1]),
                Member.id > after_id,
            )
            .order_by(Member.id)
            .limit(RENEWAL_BATCH)
        )
    ).all()
    return [(member, plan, organisation) for member, plan, organisation in rows]


async def _announce(
    session: AsyncSession,
    now: datetime,
    periods: list[int],
    rows: list[tuple[Member, str | None, str | None]],
) -> int:
    announced = {
        (notice.member_id, notice.term_ends_at, notice.days_before)
        for notice in await session.scalars(
            select(RenewalNotice).where(RenewalNotice.member_id.in_([m.id for m, _, _ in rows]))
        )
    }
    count = 0
    for member, plan_public_id, organisation_public_id in rows:
        assert member.term_ends_at is not None
        left = member.term_ends_at - now
        period = next(days for days in periods if left <= timedelta(days=days))
        if (member.id, member.term_ends_at, period) in announced:
            continue
        session.add(
            RenewalNotice(
                member_id=member.id,
                term_ends_at=member.term_ends_at,
                days_before=period,
                created_at=now,
            )
        )
        emit(
            session,
            MembershipRenewalDue(
                member_id=member.public_id,
                organisation_id=organisation_public_id,
                plan_id=plan_public_id,
                term_ends_at=member.term_ends_at,
                days_left=days_until(member.term_ends_at, now),
                occurred_at=now,
            ),
            organisation_id=member.organisation_id,
            member_public_id=member.public_id,
            occurred_at=now,
        )
        count += 1
    await session.flush()
    return count
