"""Exports: tables written to a storage integration, on demand or on a schedule.

The API only records what to export and queues runs; the worker does the work
(`exports/jobs.py`). One run of an export at a time: a run is refused while another is
queued or running, and a schedule that comes due meanwhile waits for the next occasion.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.exports import schedule
from memberhub.exports.models import Export, ExportRun, RunStatus
from memberhub.exports.repository import ExportRepository
from memberhub.exports.schemas import ExportCreate, ExportOut, ExportRunOut
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_storage, get_provider
from memberhub.integrations.service import IntegrationNotFound, get_integration
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, Forbidden, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.program.service import get_program


class ExportNotFound(NotFound):
    code = "EXPORT_NOT_FOUND"


class ExportRunNotFound(NotFound):
    code = "EXPORT_RUN_NOT_FOUND"


def require_installation_key(principal: Principal) -> None:
    """Exports carry every organisation's rows: only installation-wide keys manage them."""
    if principal.visible_organisation_ids is not None:
        raise Forbidden(
            "Exports carry every organisation's data; use an installation-wide API key.",
            code="INSTALLATION_KEY_REQUIRED",
        )


async def storage_integration(
    session: AsyncSession, principal: Principal, public_id: str
) -> Integration:
    try:
        integration = await get_integration(session, principal, public_id)
    except IntegrationNotFound:
        raise ValidationFailed(
            f"Integration {public_id} does not exist.",
            details={"field": "storage_integration_id"},
            code="STORAGE_INTEGRATION_NOT_FOUND",
        ) from None
    provider = get_provider(integration.provider)
    if provider is None or as_storage(provider) is None:
        raise ValidationFailed(
            f"Integration {public_id} ({integration.provider}) is not a storage target.",
            details={"field": "storage_integration_id"},
            code="NOT_A_STORAGE_INTEGRATION",
        )
    if integration.organisation_id is not None:
        # An export carries every organisation's rows; the organisation's own keys may
        # change where its integration writes.
        raise ValidationFailed(
            f"Integration {public_id} is an organisation's: an export (every organisation's "
            "rows) goes only to an installation-wide storage target.",
            details={"field": "storage_integration_id"},
            code="STORAGE_INTEGRATION_OF_AN_ORGANISATION",
        )
    return integration


async def reschedule_all(session: AsyncSession, timezone: str) -> int:
    """The program's time zone changed: every scheduled export's next run is read again
    on the new wall clock (`30 2 * * *` is 02:30 wherever the program now is)."""
    now = utcnow()
    scheduled = (
        await session.scalars(select(Export).where(Export.schedule.is_not(None)).with_for_update())
    ).all()
    for export in scheduled:
        assert export.schedule is not None
        export.next_run_at = schedule.next_run(export.schedule, now, timezone)
        export.updated_at = now
    return len(scheduled)


async def create_export(
    session: AsyncSession, principal: Principal, payload: ExportCreate
) -> tuple[Export, str]:
    require_installation_key(principal)
    integration = await storage_integration(session, principal, payload.storage_integration_id)
    repository = ExportRepository(session)
    if await repository.export_for(integration.id, payload.table) is not None:
        raise Conflict(
            f"The {payload.table} table is exported to {integration.public_id} already; "
            "their files would share one folder.",
            code="EXPORT_EXISTS",
        )
    now = utcnow()
    next_run_at = None
    if payload.schedule is not None:
        program = await get_program(session)
        next_run_at = schedule.next_run(payload.schedule, now, program.timezone)
    export = Export(
        public_id=new_public_id("exp"),
        name=payload.name,
        table_name=payload.table,
        format=payload.format,
        mode=payload.mode,
        storage_integration_id=integration.id,
        schedule=payload.schedule,
        next_run_at=next_run_at,
        watermark=None,
        runs_started=0,
        created_by=principal.actor.id,
        created_at=now,
        updated_at=now,
    )
    session.add(export)
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="export.create",
        object_type="export",
        object_id=export.public_id,
        changes=diff(
            {},
            {
                "table": export.table_name,
                "format": export.format,
                "mode": export.mode,
                "storage_integration_id": integration.public_id,
                "schedule": export.schedule,
            },
        ),
    )
    return export, integration.public_id


async def get_export(session: AsyncSession, principal: Principal, public_id: str) -> Export:
    require_installation_key(principal)
    export = await ExportRepository(session).export_by_public_id(public_id)
    if export is None:
        raise ExportNotFound(f"Export {public_id} does not exist.")
    return export


def queue_run(session: AsyncSession, export: Export, *, trigger: str, now: datetime) -> ExportRun:
    """A new run of the export (the caller holds the export's row lock)."""
    export.runs_started += 1
    run = ExportRun(
        public_id=new_public_id("exr"),
        export_id=export.id,
        sequence=export.runs_started,
        trigger=trigger,
        mode=export.mode,
        status=RunStatus.QUEUED,
        parts=0,
        rows=0,
        bytes=0,
        failures=0,
        created_at=now,
    )
    session.add(run)
    return run


async def start_run(session: AsyncSession, principal: Principal, public_id: str) -> ExportRun:
    export = await get_export(session, principal, public_id)
    repository = ExportRepository(session)
    locked = await repository.lock_export(export.id)
    assert locked is not None
    active = await repository.active_run(locked.id)
    if active is not None:
        raise Conflict(
            f"Run {active.public_id} of this export is {active.status}; one runs at a time.",
            details={"run_id": active.public_id},
            code="EXPORT_RUN_IN_PROGRESS",
        )
    run = queue_run(session, locked, trigger="manual", now=utcnow())
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="export.run",
        object_type="export",
        object_id=locked.public_id,
        changes={"run_id": run.public_id},
    )
    return run


async def get_run(
    session: AsyncSession, principal: Principal, export: Export, run_id: str
) -> ExportRun:
    run = await ExportRepository(session).run_by_public_id(run_id)
    if run is None or run.export_id != export.id:
        raise ExportRunNotFound(f"Run {run_id} of export {export.public_id} does not exist.")
    return run


async def list_exports(
    session: AsyncSession, principal: Principal, *, after_id: int | None, limit: int
) -> Sequence[Export]:
    require_installation_key(principal)
    return await ExportRepository(session).list_exports(after_id=after_id, limit=limit)


async def integration_public_ids(
    session: AsyncSession, exports: Sequence[Export]
) -> dict[int, str]:
    from sqlalchemy import select

    ids = {e.storage_integration_id for e in exports}
    if not ids:
        return {}
    rows = await session.execute(
        select(Integration.id, Integration.public_id).where(Integration.id.in_(ids))
    )
    return {row[0]: row[1] for row in rows}


def export_out(export: Export, storage_public_id: str) -> ExportOut:
    return ExportOut(
        id=export.public_id,
        name=export.name,
        table=export.table_name,
        format=export.format,
        mode=export.mode,
        storage_integration_id=storage_public_id,
        schedule=export.schedule,
        next_run_at=export.next_run_at,
        watermark=export.watermark,
        created_at=export.created_at,
        updated_at=export.updated_at,
    )


def run_out(run: ExportRun, export_public_id: str) -> ExportRunOut:
    progress = None
    if run.status == RunStatus.COMPLETED:
        progress = 100.0
    elif run.total_rows:
        progress = round(min(100.0, 100.0 * run.rows / run.total_rows), 2)
    elif run.total_rows == 0:
        progress = 0.0
    return ExportRunOut(
        id=run.public_id,
        export_id=export_public_id,
        sequence=run.sequence,
        trigger=run.trigger,
        mode=run.mode,
        status=run.status,
        watermark_from=run.watermark_from,
        watermark_to=run.watermark_to,
        total_rows=run.total_rows,
        rows=run.rows,
        bytes=run.bytes,
        parts=run.parts,
        progress_percent=progress,
        manifest_key=run.manifest_key,
        error=run.error,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )
