from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query

from memberhub.auth.dependencies import IntegrationsReader, IntegrationsWriter
from memberhub.crm import service
from memberhub.crm.schemas import (
    ConflictOut,
    ConflictResolution,
    ExternalSyncStatus,
    SyncActivity,
    SyncRequest,
    SyncRunOut,
    SyncRunRecordOut,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import ValidationFailed
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath, UTCDatetime

router = APIRouter(
    prefix="/api/v1", tags=["crm sync"], responses=ERROR_RESPONSES, route_class=UnitOfWorkRoute
)

Pages = Annotated[PageParams, Depends(page_params)]


@router.post("/integrations/{integration_id}/sync", status_code=202)
async def start_sync(
    integration_id: IdPath, payload: SyncRequest, session: DbSession, principal: IntegrationsWriter
) -> SyncRunOut:
    """Queue a push (every member and lead, sending only what changed) or a pull (the CRM's
    changes since the last one); the worker runs it. A dry run reports what would change."""
    run = await service.start_run(
        session, principal, integration_id, mode=payload.mode, dry_run=payload.dry_run
    )
    return service.run_out(run, integration_id)


@router.get("/integrations/{integration_id}/runs")
async def list_runs(
    integration_id: IdPath, session: DbSession, principal: IntegrationsReader, page: Pages
) -> Page[SyncRunOut]:
    """The integration's sync runs, newest first."""
    integration, _ = await service.crm_integration(session, principal, integration_id)
    rows = await service.list_runs(session, integration, after_id=page.after_id, limit=page.limit)
    items, pagination = build_page(rows, page.limit)
    return Page(
        data=[service.run_out(r, integration.public_id) for r in items], pagination=pagination
    )


@router.get("/sync-runs/{run_id}")
async def get_run(run_id: IdPath, session: DbSession, principal: IntegrationsReader) -> SyncRunOut:
    """One sync run, with its counts."""
    run, integration = await service.get_run(session, principal, run_id)
    return service.run_out(run, integration.public_id)


@router.get("/sync-runs/{run_id}/records")
async def list_run_records(
    run_id: IdPath,
    session: DbSession,
    principal: IntegrationsReader,
    page: Pages,
    outcome: Literal["created", "updated", "failed", "conflict"] | None = None,
) -> Page[SyncRunRecordOut]:
    """What the run did to each record it created, updated, failed or held for review
    (records with nothing to do are only counted in the run's `skipped`)."""
    run, _ = await service.get_run(session, principal, run_id)
    rows = await service.list_records(
        session, run, outcome=outcome, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=[service.record_out(r) for r in items], pagination=pagination)


@router.get("/integrations/{integration_id}/mappings")
async def get_mappings(
    integration_id: IdPath, session: DbSession, principal: IntegrationsReader
) -> dict[str, Any]:
    """The sync settings in force: the integration's `config.sync`, with the provider's
    defaults where it sets none."""
    _, settings = await service.crm_integration(session, principal, integration_id)
    return settings.model_dump(mode="json")


@router.get("/integrations/{integration_id}/conflicts")
async def list_conflicts(
    integration_id: IdPath,
    session: DbSession,
    principal: IntegrationsReader,
    page: Pages,
    status: Annotated[Literal["open", "resolved"] | None, Query()] = None,
) -> Page[ConflictOut]:
    """Fields changed on both sides under the manual-review policy."""
    integration, _ = await service.crm_integration(session, principal, integration_id)
    rows = await service.list_conflicts(
        session, integration, status=status, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(
        data=[service.conflict_out(c, integration.public_id) for c in items],
        pagination=pagination,
    )


@router.post("/crm-conflicts/{conflict_id}/resolve")
async def resolve_conflict(
    conflict_id: IdPath,
    payload: ConflictResolution,
    session: DbSession,
    principal: IntegrationsWriter,
) -> ConflictOut:
    """Settle a sync conflict by keeping memberhub's value or the CRM's."""
    conflict, integration = await service.resolve_conflict(
        session, principal, conflict_id, keep=payload.keep
    )
    return service.conflict_out(conflict, integration.public_id)


@router.get("/external/sync/status")
async def external_sync_status(
    session: DbSession, principal: IntegrationsReader
) -> ExternalSyncStatus:
    """CRM sync at a glance (seed 003's shape): the last run, changes waiting to be sent,
    records whose last write failed, open conflicts, connected CRMs."""
    return await service.external_status(session, principal)


@router.get("/external/sync/activity")
async def external_sync_activity(
    session: DbSession, principal: IntegrationsReader, since: UTCDatetime | None = None
) -> SyncActivity:
    """What CRM sync runs started since `since` (default: the start of today, UTC) did:
    leads imported and updated by pulls, records created, updated and failed, runs, their
    mean duration and the share that completed (seed 003's "today's activity")."""
    now = utcnow()
    if since is not None and since > now:
        raise ValidationFailed(
            "since must be a past moment.", details={"field": "since", "now": now.isoformat()}
        )
    start = since or now.replace(hour=0, minute=0, second=0, microsecond=0)
    return await service.activity(session, principal, since=start)
