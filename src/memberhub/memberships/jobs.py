from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.kit.actor import Actor
from memberhub.memberships.repository import members_due_for_transition
from memberhub.memberships.service import advance_due_member

SCHEDULER = Actor.system("system:scheduler")
CHUNK_SIZE = 500


async def advance_membership_statuses(
    session: AsyncSession, now: datetime, *, max_members: int = 5000
) -> int:
    """Move members whose term or grace period has ended. Safe to run twice or in parallel:
    each member row is locked while it moves, and a member already moved is not due."""
    moved = 0
    seen = 0
    while seen < max_members:
        due = await members_due_for_transition(session, now, limit=CHUNK_SIZE)
        if not due:
            break
        seen += len(due)
        for member in due:
            if await advance_due_member(session, SCHEDULER, member, now):
                moved += 1
        if len(due) < CHUNK_SIZE:
            break
    return moved
