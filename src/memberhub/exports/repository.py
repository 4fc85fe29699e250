from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.exports.models import Export, ExportPart, ExportRun, RunStatus
from memberhub.exports.tables import ExportTable


class ExportRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # ------------------------------------------------------------ exports

    async def export_by_public_id(self, public_id: str) -> Export | None:
        return await self.session.scalar(select(Export).where(Export.public_id == public_id))

    async def export_for(self, storage_integration_id: int, table_name: str) -> Export | None:
        return await self.session.scalar(
            select(Export).where(
                Export.storage_integration_id == storage_integration_id,
                Export.table_name == table_name,
            )
        )

    async def lock_export(self, export_id: int) -> Export | None:
        return await self.session.scalar(
            select(Export)
            .where(Export.id == export_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )

    async def list_exports(self, *, after_id: int | None, limit: int) -> Sequence[Export]:
        query = select(Export).order_by(Export.id).limit(limit + 1)
        if after_id is not None:
            query = query.where(Export.id > after_id)
        return (await self.session.scalars(query)).all()

    async def due_exports(self, now: datetime, limit: int) -> Sequence[Export]:
        """Scheduled exports whose time came, locked; other workers skip them."""
        return (
            await self.session.scalars(
                select(Export)
                .where(Export.next_run_at.is_not(None), Export.next_run_at <= now)
                .order_by(Export.next_run_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()

    # ------------------------------------------------------------ runs

    async def run_by_public_id(self, public_id: str) -> ExportRun | None:
        return await self.session.scalar(select(ExportRun).where(ExportRun.public_id == public_id))

    async def active_run(self, export_id: int) -> ExportRun | None:
        return await self.session.scalar(
            select(ExportRun)
            .where(ExportRun.export_id == export_id, ExportRun.status.in_(RunStatus.ACTIVE))
            .limit(1)
        )

    async def list_runs(
        self, export_id: int, *, before_id: int | None, limit: int
    ) -> Sequence[ExportRun]:
        """Newest first."""
        query = (
            select(ExportRun)
            .where(ExportRun.export_id == export_id)
            .order_by(ExportRun.id.desc())
            .limit(limit + 1)
        )
        if before_id is not None:
            query = query.where(ExportRun.id < before_id)
        return (await self.session.scalars(query)).all()

    async def claim_next_run(self, now: datetime) -> ExportRun | None:
        """The oldest run waiting for a worker: queued, or running under a lease that ran
        out (its worker died). Locked; other workers skip it."""
        claimable = or_(
            ExportRun.status == RunStatus.QUEUED,
            and_(
                ExportRun.status == RunStatus.RUNNING,
                or_(ExportRun.lease_expires_at.is_(None), ExportRun.lease_expires_at <= now),
            ),
        )
        return await self.session.scalar(
            select(ExportRun)
            .where(claimable)
            .order_by(ExportRun.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )

    async def lock_run(self, run_id: int) -> ExportRun | None:
        return await self.session.scalar(
            select(ExportRun)
            .where(ExportRun.id == run_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )

    async def parts(self, run_id: int) -> Sequence[ExportPart]:
        return (
            await self.session.scalars(
                select(ExportPart).where(ExportPart.run_id == run_id).order_by(ExportPart.number)
            )
        ).all()

    async def earlier_full_runs(self, export_id: int, sequence: int) -> Sequence[ExportRun]:
        return (
            await self.session.scalars(
                select(ExportRun).where(
                    ExportRun.export_id == export_id,
                    ExportRun.sequence < sequence,
                    ExportRun.mode == "full",
                    ExportRun.status.in_((RunStatus.COMPLETED, RunStatus.FAILED)),
                )
            )
        ).all()

    # ------------------------------------------------------------ the exported tables

    async def highest_key(self, spec: ExportTable) -> int | None:
        highest = await self.session.scalar(select(func.max(spec.sql_table.c[spec.key])))
        return int(highest) if highest is not None else None

    async def count_range(self, spec: ExportTable, after: int | None, upper: int | None) -> int:
        """Rows with after < key <= upper."""
        if upper is None:
            return 0
        key = spec.sql_table.c[spec.key]
        query = select(func.count()).select_from(spec.sql_table).where(key <= upper)
        if after is not None:
            query = query.where(key > after)
        return int(await self.session.scalar(query) or 0)

    async def writers_in_flight(self, spec: ExportTable) -> list[str]:
        """PostgreSQL: the transactions (virtual ids) that may be writing to the table now."""
        rows = await self.session.execute(
            text(
                "SELECT DISTINCT virtualtransaction FROM pg_locks"
                " WHERE locktype = 'relation' AND relation = CAST(:table AS regclass)"
                " AND mode = 'RowExclusiveLock' AND pid <> pg_backend_pid()"
            ),
            {"table": spec.table},
        )
        return [str(row[0]) for row in rows]

    async def still_running(self, virtual_ids: list[str]) -> int:
        """How many of these transactions have not ended yet."""
        if not virtual_ids:
            return 0
        found = await self.session.scalar(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'virtualxid'"
                " AND virtualxid = ANY(CAST(:ids AS text[]))"
            ),
            {"ids": virtual_ids},
        )
        return int(found or 0)
