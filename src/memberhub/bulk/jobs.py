"""The worker side of bulk awards: claim a waiting job, apply it a chunk per transaction.

A worker holds a job under a lease, renewed with every chunk; a worker that dies leaves the
lease to run out and the next worker continues from the first unprocessed chunk. On
PostgreSQL the claim skips jobs another worker has locked. A run stops taking chunks after
`TIME_BUDGET` and hands the job back, so one large upload does not hold up the worker's
other scheduled jobs; the next run carries on.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import structlog
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from memberhub.bulk import service
from memberhub.kit.db import Database

log = structlog.get_logger("memberhub.bulk")

TIME_BUDGET = timedelta(seconds=20)


def _transient(exc: BaseException) -> bool:
    """A database hiccup worth retrying (connection lost, deadlock, serialisation)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError):
        sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
        return exc.connection_invalidated or sqlstate.startswith(("08", "40", "53", "57"))
    return False


async def process_bulk_awards(
    db: Database, now: datetime, *, time_budget: timedelta = TIME_BUDGET
) -> int:
    """Apply waiting bulk award jobs, a chunk per transaction; returns the rows processed.

    `now` is when the run started; later chunks see it advanced by the time spent.
    """
    started = time.monotonic()

    def clock() -> datetime:
        return now + timedelta(seconds=time.monotonic() - started)

    processed = 0
    while True:
        async with db.transaction() as session:
            claim = await service.claim_job(session, clock())
        if claim is None:
            return processed
        job_id, lease = claim
        while True:
            try:
                async with db.transaction() as session:
                    step = await service.apply_next_chunk(session, job_id, lease, clock())
            except Exception as exc:
                await _stop(db, job_id, lease, exc, clock())
                raise
            if step is None:
                break
            processed += step.rows
            if step.finished or step.lease is None:
                break
            lease = step.lease
            if clock() - now >= time_budget:
                async with db.transaction() as session:
                    await service.release_job(session, job_id, lease)
                return processed
        if clock() - now >= time_budget:
            return processed


async def _stop(db: Database, job_id: int, lease: datetime, exc: Exception, now: datetime) -> None:
    """After a chunk failed unexpectedly: give the job back if the cause may pass, else mark
    it failed (its processed chunks stay applied)."""
    async with db.transaction() as session:
        if _transient(exc):
            await service.release_job(session, job_id, lease)
        else:
            await service.fail_job(
                session,
                job_id,
                lease,
                f"Processing stopped by an unexpected error ({type(exc).__name__}).",
                now,
            )
    log.warning("bulk_chunk_failed", job_id=job_id, error_type=type(exc).__name__)
