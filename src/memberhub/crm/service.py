"""CRM sync as the API offers it: start runs, read them, settle conflicts, status."""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth.principal import Principal
from memberhub.crm import sync
from memberhub.crm.mapping import EntityType, SyncSettings, inbound_value
from memberhub.crm.models import (
    ConflictStatus,
    CrmConflict,
    CrmLink,
    RunStatus,
    SyncRun,
    SyncRunRecord,
)
from memberhub.crm.schemas import (
    ConflictOut,
    ExternalSyncStatus,
    SyncActivity,
    SyncRunOut,
    SyncRunRecordOut,
)
from memberhub.crm.values import load_values, scope_ids
from memberhub.integrations.models import Integration
from memberhub.integrations.service import get_integration
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, NotFound, ValidationFailed


class SyncRunNotFound(NotFound):
    code = "SYNC_RUN_NOT_FOUND"


class ConflictNotFound(NotFound):
    code = "CONFLICT_NOT_FOUND"


class ConflictResolved(Conflict):
    code = "CONFLICT_ALREADY_RESOLVED"


def run_out(run: SyncRun, integration_public_id: str) -> SyncRunOut:
    return SyncRunOut(
        id=run.public_id,
        integration_id=integration_public_id,
        mode=run.mode,
        trigger=run.trigger,
        dry_run=run.dry_run,
        status=run.status,
        created=run.created,
        updated=run.updated,
        skipped=run.skipped,
        failed=run.failed,
        conflicts=run.conflicts,
        requests=run.requests,
        cursor_before=run.cursor_before,
        cursor_after=run.cursor_after,
        error=run.error,
        requested_by=run.requested_by,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )


def record_out(record: SyncRunRecord) -> SyncRunRecordOut:
    return SyncRunRecordOut(
        entity_type=record.entity_type,
        entity_id=record.entity_public_id,
        external_id=record.external_id,
        outcome=record.outcome,
        changes=record.changes,
        error=record.error,
    )


def conflict_out(conflict: CrmConflict, integration_public_id: str) -> ConflictOut:
    return ConflictOut(
        id=conflict.public_id,
        integration_id=integration_public_id,
        entity_type=conflict.entity_type,
        entity_id=conflict.entity_public_id,
        external_id=conflict.external_id,
        field=conflict.field,
        property=conflict.property,
        memberhub_value=conflict.values.get("memberhub"),
        crm_value=conflict.values.get("crm"),
        crm_modified_at=conflict.crm_modified_at,
        status=conflict.status,
        resolution=conflict.resolution,
        resolved_by=conflict.resolved_by,
        created_at=conflict.created_at,
        resolved_at=conflict.resolved_at,
    )


async def crm_integration(
    session: AsyncSession, principal: Principal, public_id: str
) -> tuple[Integration, SyncSettings]:
    integration = await get_integration(session, principal, public_id)
    found = sync.crm_of(integration)
    if found is None:
        raise sync.NotACrm(
            f"Integration {public_id} ({integration.provider}) does not sync with a CRM."
        )
    return integration, found[1]


async def start_run(
    session: AsyncSession, principal: Principal, public_id: str, *, mode: str, dry_run: bool
) -> SyncRun:
    integration, _settings = await crm_integration(session, principal, public_id)
    if not integration.enabled:
        raise Conflict("The integration is disabled.", details={"integration_id": public_id})
    run = sync.new_run(
        integration, mode=mode, trigger="manual", dry_run=dry_run, requested_by=principal.actor.id
    )
    session.add(run)
    await sync.ensure_state(session, integration.id)
    await session.flush()
    return run


async def list_runs(
    session: AsyncSession, integration: Integration, *, after_id: int | None, limit: int
) -> list[SyncRun]:
    query = (
        select(SyncRun)
        .where(SyncRun.integration_id == integration.id)
        .order_by(SyncRun.id.desc())
        .limit(limit + 1)
    )
    if after_id is not None:
        query = query.where(SyncRun.id < after_id)
    return list(await session.scalars(query))


async def get_run(
    session: AsyncSession, principal: Principal, public_id: str
) -> tuple[SyncRun, Integration]:
    row = (
        await session.execute(
            select(SyncRun, Integration)
            .join(Integration, Integration.id == SyncRun.integration_id)
            .where(SyncRun.public_id == public_id)
        )
    ).first()
    if row is None or not principal.can_see_organisation(row[1].organisation_id):
        raise SyncRunNotFound(f"Sync run {public_id} does not exist.")
    return row[0], row[1]


async def list_records(
    session: AsyncSession, run: SyncRun, *, outcome: str | None, after_id: int | None, limit: int
) -> list[SyncRunRecord]:
    filters = [SyncRunRecord.run_id == run.id]
    if outcome is not None:
        filters.append(SyncRunRecord.outcome == outcome)
    return await _oldest_first(session, SyncRunRecord, filters, after_id, limit)


async def list_conflicts(
    session: AsyncSession,
    integration: Integration,
    *,
    status: str | None,
    after_id: int | None,
    limit: int,
) -> list[CrmConflict]:
    filters = [CrmConflict.integration_id == integration.id]
    if status is not None:
        filters.append(CrmConflict.status == status)
    return await _oldest_first(session, CrmConflict, filters, after_id, limit)


Row = TypeVar("Row", SyncRunRecord, CrmConflict)


async def _oldest_first(
    session: AsyncSession,
    model: type[Row],
    filters: list[ColumnElement[bool]],
    after_id: int | None,
    limit: int,
) -> list[Row]:
    """A page of rows by id (one more than `limit`, for `build_page`)."""
    if after_id is not None:
        filters = [*filters, model.id > after_id]
    query = select(model).where(*filters).order_by(model.id).limit(limit + 1)
    return list(await session.scalars(query))


async def resolve_conflict(
    session: AsyncSession, principal: Principal, public_id: str, *, keep: str
) -> tuple[CrmConflict, Integration]:
    row = (
        await session.execute(
            select(CrmConflict, Integration)
            .join(Integration, Integration.id == CrmConflict.integration_id)
            .where(CrmConflict.public_id == public_id)
            .with_for_update(of=CrmConflict)
        )
    ).first()
    if row is None or not principal.can_see_organisation(row[1].organisation_id):
        raise ConflictNotFound(f"Conflict {public_id} does not exist.")
    conflict, integration = row[0], row[1]
    if conflict.status != ConflictStatus.OPEN:
        raise ConflictResolved(f"Conflict {public_id} was already resolved.")
    found = sync.crm_of(integration)
    link = await session.get(CrmLink, conflict.link_id, with_for_update=True)
    if found is None or link is None:
        raise Conflict("The integration no longer syncs this record; nothing to resolve.")
    settings = found[1]
    entity: EntityType = "members" if conflict.entity_type == "members" else "leads"
    spec = getattr(settings, entity)
    crm_value = conflict.values.get("crm")
    now = utcnow()
    if keep == "crm":
        field_map = (
            next((f for f in spec.fields if f.target == conflict.property), None)
            if spec is not None
            else None
        )
        if field_map is None:
            raise Conflict("The field is no longer mapped; nothing to resolve.")
        try:
            value = inbound_value(field_map, crm_value)
        except ValueError as exc:
            raise ValidationFailed(f"The CRM's value cannot be taken: {exc}.") from None
        patch: dict[str, Any]
        if field_map.source.startswith("custom."):
            patch = {"custom_fields": {field_map.source.removeprefix("custom."): value}}
        else:
            patch = {field_map.source: value}
        scope = await scope_ids(session, integration.organisation_id)
        values = (await load_values(session, entity, [link.entity_id], scope)).get(link.entity_id)
        if values is None:
            raise Conflict("The record no longer exists; nothing to resolve.")
        try:
            await sync.update_entity(session, integration, entity, values, patch)
        except ValidationError as exc:
            raise ValidationFailed(
                f"The CRM's value is not valid here: {exc.errors()[0]['msg']}.",
                details={"field": field_map.source, "value": crm_value},
            ) from None
    else:
        # Our value differs from what was last agreed, so the next push sends it.
        link.pending_at = now
        link.pending_since = link.pending_since or now
    link.synced = {**link.synced, conflict.property: crm_value}
    link.held = {k: v for k, v in link.held.items() if k != conflict.property}
    conflict.status = ConflictStatus.RESOLVED
    conflict.resolution = keep
    conflict.resolved_by = principal.actor.id
    conflict.resolved_at = now
    await session.flush()
    return conflict, integration


async def _connected_crms(session: AsyncSession, principal: Principal) -> list[Integration]:
    """The principal's enabled integrations that sync with a CRM."""
    query = select(Integration).where(Integration.enabled.is_(True)).order_by(Integration.id)
    if principal.visible_organisation_ids is not None:
        query = query.where(Integration.organisation_id.in_(principal.visible_organisation_ids))
    return [i for i in await session.scalars(query) if sync.crm_of(i) is not None]


async def external_status(session: AsyncSession, principal: Principal) -> ExternalSyncStatus:
    crms = await _connected_crms(session, principal)
    ids = [i.id for i in crms]
    last_sync = await session.scalar(
        select(func.max(SyncRun.finished_at)).where(
            SyncRun.integration_id.in_(ids),
            SyncRun.status == RunStatus.COMPLETED,
            SyncRun.dry_run.is_(False),
        )
    )
    pending = await session.scalar(
        select(func.count())
        .select_from(CrmLink)
        .where(CrmLink.integration_id.in_(ids), CrmLink.pending_at.is_not(None))
    )
    errors = await session.scalar(
        select(func.count())
        .select_from(CrmLink)
        .where(CrmLink.integration_id.in_(ids), CrmLink.last_error.is_not(None))
    )
    conflicts = await session.scalar(
        select(func.count())
        .select_from(CrmConflict)
        .where(CrmConflict.integration_id.in_(ids), CrmConflict.status == ConflictStatus.OPEN)
    )
    return ExternalSyncStatus(
        last_sync=last_sync,
        pending_updates=pending or 0,
        sync_errors=errors or 0,
        open_conflicts=conflicts or 0,
        connected_crms=sorted({i.provider for i in crms}),
    )


async def activity(session: AsyncSession, principal: Principal, *, since: datetime) -> SyncActivity:
    """What the principal's connected CRMs' runs started at or after `since` did (dry runs
    left out: they change nothing). Counts come from the runs' per-record outcomes."""
    ids = [i.id for i in await _connected_crms(session, principal)]
    runs_since = (
        SyncRun.integration_id.in_(ids),
        SyncRun.dry_run.is_(False),
        SyncRun.started_at >= since,
    )
    run_rows = (
        await session.execute(
            select(SyncRun.status, SyncRun.started_at, SyncRun.finished_at).where(*runs_since)
        )
    ).all()
    finished = [
        (status, started, ended)
        for status, started, ended in run_rows
        if started is not None and ended is not None
    ]
    completed = sum(1 for status, _, _ in finished if status == RunStatus.COMPLETED)
    outcome_rows = await session.execute(
        select(SyncRun.mode, SyncRunRecord.entity_type, SyncRunRecord.outcome, func.count())
        .join(SyncRun, SyncRun.id == SyncRunRecord.run_id)
        .where(*runs_since)
        .group_by(SyncRun.mode, SyncRunRecord.entity_type, SyncRunRecord.outcome)
    )
    outcomes: dict[tuple[str, str | None, str], int] = {
        (row[0], row[1], row[2]): row[3] for row in outcome_rows
    }

    def count(outcome: str, *, mode: str | None = None, entity: str | None = None) -> int:
        return sum(
            n
            for (m, e, o), n in outcomes.items()
            if o == outcome and (mode is None or m == mode) and (entity is None or e == entity)
        )

    seconds = [(ended - started).total_seconds() for _, started, ended in finished]
    return SyncActivity(
        since=since,
        runs=len(run_rows),
        completed_runs=completed,
        failed_runs=sum(1 for row in run_rows if row[0] == RunStatus.FAILED),
        leads_imported=count("created", mode="pull", entity="leads"),
        leads_updated=count("updated", mode="pull", entity="leads"),
        records_created=count("created"),
        records_updated=count("updated"),
        records_failed=count("failed"),
        average_run_seconds=round(sum(seconds) / len(seconds), 3) if seconds else None,
        success_rate=round(100.0 * completed / len(finished), 2) if finished else None,
    )
