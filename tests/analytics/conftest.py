"""Fixtures for the analytics tests: moving recorded history into the past."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points.models import PointTransaction

MoveIntoPast = Callable[[datetime, timedelta], Awaitable[None]]
SetMemberSince = Callable[[str, datetime, str | None], Awaitable[None]]


@pytest.fixture
def move_into_past(db: Database) -> MoveIntoPast:
    """Move every ledger transaction and member created at or after `since` back by `by`,
    as if that part of the history had happened earlier (order within it is kept)."""

    async def _move(since: datetime, by: timedelta) -> None:
        async with db.transaction() as session:
            txns = await session.execute(
                select(PointTransaction.id, PointTransaction.occurred_at).where(
                    PointTransaction.occurred_at >= since
                )
            )
            for txn_id, occurred_at in txns.all():
                await session.execute(
                    update(PointTransaction)
                    .where(PointTransaction.id == txn_id)
                    .values(occurred_at=occurred_at - by)
                )
            members = await session.execute(
                select(Member.id, Member.created_at).where(Member.created_at >= since)
            )
            for member_id, created_at in members.all():
                await session.execute(
                    update(Member).where(Member.id == member_id).values(created_at=created_at - by)
                )

    return _move


@pytest.fixture
def set_member_since(db: Database) -> SetMemberSince:
    """Set when a member joined, and their tier."""

    async def _set(public_id: str, since: datetime, tier: str | None) -> None:
        async with db.transaction() as session:
            await session.execute(
                update(Member)
                .where(Member.public_id == public_id)
                .values(member_since=since, tier=tier)
                .execution_options(synchronize_session=False)
            )

    return _set
