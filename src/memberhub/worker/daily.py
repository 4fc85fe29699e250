"""Daily jobs run once a day at `DAILY_JOBS_AT` in the program's time zone, whichever
worker gets there first, and once at start when the last scheduled run was missed."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import or_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from memberhub.kit.db import Database
from memberhub.program import service as program_service
from memberhub.worker.models import DailyJobRun


def last_scheduled(now: datetime, at: time, zone: ZoneInfo) -> datetime:
    """The most recent moment, at or before `now`, when the clock in `zone` read `at`.
    Compared as instants: two times of one zone compare by their wall clocks, and a time
    the clock skips (02:30 on a spring-forward day) lies an hour later than it reads. Such
    a time is taken an hour on (03:30), once; a time the clock reads twice, at the first."""
    local = now.astimezone(zone)
    scheduled = datetime.combine(local.date(), at, zone).astimezone(UTC)
    if scheduled > now:
        scheduled = datetime.combine(local.date() - timedelta(days=1), at, zone).astimezone(UTC)
    return scheduled.astimezone(now.tzinfo)


async def claim_daily_run(db: Database, name: str, now: datetime, at: time) -> bool:
    """True when this worker should run `name` now: its last run started before the most
    recent scheduled moment. Claimed in one statement, so two workers never both run it."""
    async with db.transaction() as session:
        program = await program_service.get_program(session)
        due_since = last_scheduled(now, at, ZoneInfo(program.timezone))
        dialect = session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        await session.execute(
            insert(DailyJobRun).values(name=name, last_run_at=None).on_conflict_do_nothing()
        )
        claimed = await session.execute(
            update(DailyJobRun)
            .where(
                DailyJobRun.name == name,
                or_(DailyJobRun.last_run_at.is_(None), DailyJobRun.last_run_at < due_since),
            )
            .values(last_run_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(claimed, "rowcount", 0))
