from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from memberhub.auth.dependencies import IntegrationsWriter
from memberhub.exports import service
from memberhub.exports.repository import ExportRepository
from memberhub.exports.schemas import ExportCreate, ExportOut, ExportRunOut
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath

# Exports carry whole tables: they take the integrations:write scope (administrators) and
# an installation-wide key.
router = APIRouter(
    prefix="/api/v1", tags=["exports"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)

Pages = Annotated[PageParams, Depends(page_params)]


@router.post("/exports", status_code=201)
async def create_export(
    payload: ExportCreate, response: Response, session: DbSession, principal: IntegrationsWriter
) -> ExportOut:
    """Export a table to a storage integration: on demand (`POST …/runs`) and, with a
    `schedule`, by cron in the program's time zone. The worker writes the files."""
    export, storage_id = await service.create_export(session, principal, payload)
    response.headers["Location"] = f"/api/v1/exports/{export.public_id}"
    return service.export_out(export, storage_id)


@router.get("/exports")
async def list_exports(
    session: DbSession, principal: IntegrationsWriter, page: Pages
) -> Page[ExportOut]:
    """Exports, oldest first."""
    rows = await service.list_exports(session, principal, after_id=page.after_id, limit=page.limit)
    items, pagination = build_page(rows, page.limit)
    storage_ids = await service.integration_public_ids(session, items)
    return Page(
        data=[service.export_out(e, storage_ids[e.storage_integration_id]) for e in items],
        pagination=pagination,
    )


@router.get("/exports/{export_id}")
async def get_export(
    export_id: IdPath, session: DbSession, principal: IntegrationsWriter
) -> ExportOut:
    """An export: what it writes where, its schedule and its watermark."""
    export = await service.get_export(session, principal, export_id)
    storage_ids = await service.integration_public_ids(session, [export])
    return service.export_out(export, storage_ids[export.storage_integration_id])


@router.post("/exports/{export_id}/runs", status_code=202)
async def start_export_run(
    export_id: IdPath, response: Response, session: DbSession, principal: IntegrationsWriter
) -> ExportRunOut:
    """Run the export now: queued for the worker; 409 while a run is queued or running."""
    run = await service.start_run(session, principal, export_id)
    response.headers["Location"] = f"/api/v1/exports/{export_id}/runs/{run.public_id}"
    return service.run_out(run, export_id)


@router.get("/exports/{export_id}/runs")
async def list_export_runs(
    export_id: IdPath, session: DbSession, principal: IntegrationsWriter, page: Pages
) -> Page[ExportRunOut]:
    """The export's runs, newest first, with their progress."""
    export = await service.get_export(session, principal, export_id)
    rows = await ExportRepository(session).list_runs(
        export.id, before_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=[service.run_out(r, export.public_id) for r in items], pagination=pagination)


@router.get("/exports/{export_id}/runs/{run_id}")
async def get_export_run(
    export_id: IdPath, run_id: IdPath, session: DbSession, principal: IntegrationsWriter
) -> ExportRunOut:
    """A run: status, rows and bytes written so far, its key range and manifest."""
    export = await service.get_export(session, principal, export_id)
    run = await service.get_run(session, principal, export, run_id)
    return service.run_out(run, export.public_id)
