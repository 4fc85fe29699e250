from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.kit.clock import utcnow
from memberhub.worker.models import WorkerHeartbeat


async def beat(session: AsyncSession, worker_id: str, started_at: datetime) -> None:
    row = await session.get(WorkerHeartbeat, worker_id)
    now = utcnow()
    if row is None:
        session.add(WorkerHeartbeat(worker_id=worker_id, started_at=started_at, last_seen_at=now))
    else:
        row.last_seen_at = now


async def latest(session: AsyncSession) -> datetime | None:
    return await session.scalar(select(func.max(WorkerHeartbeat.last_seen_at)))
