"""Fixtures for the membership tests: moving a member's dates, running the scheduled job."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

import pytest
from sqlalchemy import select, update

from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.memberships.jobs import advance_membership_statuses
from memberhub.memberships.models import MembershipTerm

SetTermDates = Callable[[str, datetime, datetime | None], Awaitable[None]]
RunJob = Callable[[datetime], Awaitable[int]]


@pytest.fixture
def set_term_dates(db: Database) -> SetTermDates:
    """Move a member's current term to end at `term_ends_at` (grace until `grace_ends_at`),
    keeping its length: the member row and its newest term row agree afterwards."""

    async def _set(public_id: str, term_ends_at: datetime, grace_ends_at: datetime | None) -> None:
        async with db.transaction() as session:
            member = await session.scalar(select(Member).where(Member.public_id == public_id))
            assert member is not None
            term = await session.scalar(
                select(MembershipTerm)
                .where(MembershipTerm.member_id == member.id)
                .order_by(MembershipTerm.id.desc())
                .limit(1)
            )
            assert term is not None
            shift = term_ends_at - term.ends_at
            await session.execute(
                update(MembershipTerm)
                .where(MembershipTerm.id == term.id)
                .values(starts_at=term.starts_at + shift, ends_at=term_ends_at)
            )
            await session.execute(
                update(Member)
                .where(Member.id == member.id)
                .values(term_ends_at=term_ends_at, grace_ends_at=grace_ends_at)
            )

    return _set


@pytest.fixture
def run_job(db: Database) -> RunJob:
    """Run the scheduled status job once, in its own transaction, as of `now`."""

    async def _run(now: datetime) -> int:
        async with db.transaction() as session:
            return await advance_membership_statuses(session, now)

    return _run
