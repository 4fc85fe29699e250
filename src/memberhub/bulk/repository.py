from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.bulk.models import (
    BulkJob,
    BulkJobChunk,
    BulkJobRow,
    BulkJobStatus,
    BulkOperation,
    RowOutcome,
)
from memberhub.members.models import Member


class BulkRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # ------------------------------------------------------------ jobs

    async def job_by_public_id(self, public_id: str) -> BulkJob | None:
        return await self.session.scalar(select(BulkJob).where(BulkJob.public_id == public_id))

    async def list_jobs(
        self,
        *,
        organisation_ids: frozenset[int] | None,
        status: str | None,
        before_id: int | None,
        limit: int,
        operation: str = BulkOperation.AWARD,
    ) -> Sequence[BulkJob]:
        """Newest first, paged by id."""
        query = (
            select(BulkJob)
            .where(BulkJob.operation == operation)
            .order_by(BulkJob.id.desc())
            .limit(limit + 1)
        )
        if before_id is not None:
            query = query.where(BulkJob.id < before_id)
        if organisation_ids is not None:
            query = query.where(BulkJob.organisation_id.in_(organisation_ids))
        if status is not None:
            query = query.where(BulkJob.status == status)
        return (await self.session.scalars(query)).all()

    async def claim_next_job(self, now: datetime) -> BulkJob | None:
        """The oldest job waiting for a worker: queued, or running under a lease that ran out
        (its worker died). Locked; other workers skip it."""
        claimable = or_(
            BulkJob.status == BulkJobStatus.QUEUED,
            and_(
                BulkJob.status == BulkJobStatus.RUNNING,
                or_(BulkJob.lease_expires_at.is_(None), BulkJob.lease_expires_at <= now),
            ),
        )
        return await self.session.scalar(
            select(BulkJob)
            .where(claimable)
            .order_by(BulkJob.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )

    async def lock_job(self, job_id: int) -> BulkJob | None:
        return await self.session.scalar(
            select(BulkJob)
            .where(BulkJob.id == job_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )

    # ------------------------------------------------------------ chunks

    async def insert_chunks(self, chunks: list[dict[str, Any]]) -> None:
        await self.session.execute(insert(BulkJobChunk), chunks)

    async def next_chunk(self, job_id: int) -> BulkJobChunk | None:
        return await self.session.scalar(
            select(BulkJobChunk)
            .where(BulkJobChunk.job_id == job_id, BulkJobChunk.processed_at.is_(None))
            .order_by(BulkJobChunk.sequence)
            .limit(1)
            .with_for_update()
        )

    # ------------------------------------------------------------ row outcomes

    async def has_unprocessed_chunks(self, job_id: int) -> bool:
        found = await self.session.scalar(
            select(BulkJobChunk.id)
            .where(BulkJobChunk.job_id == job_id, BulkJobChunk.processed_at.is_(None))
            .limit(1)
        )
        return found is not None

    async def recorded_rows(self, job_id: int, first_row: int, last_row: int) -> set[int]:
        """Row numbers in the range that already have an outcome."""
        found = await self.session.scalars(
            select(BulkJobRow.row_number).where(
                BulkJobRow.job_id == job_id,
                BulkJobRow.row_number >= first_row,
                BulkJobRow.row_number <= last_row,
            )
        )
        return set(found)

    async def rows_naming(
        self, job_id: int, column: str, keys: Iterable[str], *, before: int
    ) -> list[tuple[int, str | None, str | None]]:
        """The job's rows before row `before` that changed something (unchanged and failed
        rows changed nothing) and whose `column` (`match_email` or `match_external`) is one
        of `keys`: (row number, match_email, match_external)."""
        found = await self.session.execute(
            select(BulkJobRow.row_number, BulkJobRow.match_email, BulkJobRow.match_external).where(
                BulkJobRow.job_id == job_id,
                getattr(BulkJobRow, column).is_not(None),
                getattr(BulkJobRow, column).in_(list(keys)),
                BulkJobRow.row_number < before,
                BulkJobRow.outcome == RowOutcome.APPLIED,
            )
        )
        return [(number, email, external) for number, email, external in found]

    async def uploaded_rows(self, job_id: int, numbers: Sequence[int]) -> list[dict[str, Any]]:
        """The uploaded rows with these numbers, in the order given, read from their
        chunks."""
        starts = list(
            await self.session.scalars(
                select(BulkJobChunk.first_row)
                .where(BulkJobChunk.job_id == job_id)
                .order_by(BulkJobChunk.first_row)
            )
        )
        wanted = {starts[bisect.bisect_right(starts, number) - 1] for number in numbers}
        lines: dict[int, str] = {}
        chunks = await self.session.execute(
            select(BulkJobChunk.first_row, BulkJobChunk.rows).where(
                BulkJobChunk.job_id == job_id, BulkJobChunk.first_row.in_(wanted)
            )
        )
        for first_row, text in chunks:
            for number, line in enumerate(text.split("\n"), start=first_row):
                lines[number] = line
        return [json.loads(lines[number]) for number in numbers]

    async def insert_rows(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            await self.session.execute(insert(BulkJobRow), rows)

    async def list_rows(
        self, job_id: int, *, outcome: str | None, after_row: int | None, limit: int
    ) -> Sequence[BulkJobRow]:
        """In row order, paged by row number."""
        query = (
            select(BulkJobRow)
            .where(BulkJobRow.job_id == job_id)
            .order_by(BulkJobRow.row_number)
            .limit(limit + 1)
        )
        if after_row is not None:
            query = query.where(BulkJobRow.row_number > after_row)
        if outcome is not None:
            query = query.where(BulkJobRow.outcome == outcome)
        return (await self.session.scalars(query)).all()

    # ------------------------------------------------------------ members

    def _visible_members(self, organisation_ids: frozenset[int] | None) -> Select[Member]:
        query = select(Member).where(Member.deleted_at.is_(None))
        if organisation_ids is not None:
            query = query.where(Member.organisation_id.in_(organisation_ids))
        return query

    async def members_by_public_id(
        self, public_ids: Iterable[str], organisation_ids: frozenset[int] | None
    ) -> dict[str, Member]:
        wanted = list(set(public_ids))
        if not wanted:
            return {}
        query = self._visible_members(organisation_ids).where(Member.public_id.in_(wanted))
        return {member.public_id: member for member in await self.session.scalars(query)}

    async def members_by_email(
        self, emails_normalized: Iterable[str], organisation_ids: frozenset[int] | None
    ) -> dict[str, list[Member]]:
        """Members by normalised email; an email can belong to a member in each organisation."""
        wanted = list(set(emails_normalized))
        if not wanted:
            return {}
        query = self._visible_members(organisation_ids).where(Member.email_normalized.in_(wanted))
        found: dict[str, list[Member]] = {}
        for member in await self.session.scalars(query):
            assert member.email_normalized is not None
            found.setdefault(member.email_normalized, []).append(member)
        return found
