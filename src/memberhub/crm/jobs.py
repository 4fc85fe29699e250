"""The worker's side of CRM sync: notice changes, schedule runs, run them.

Every tick, for each enabled CRM integration:
1. read the events written since the last tick and mark the members and leads they
   concern as having changes (a link's `pending_at`);
2. queue a pull when its interval has passed, and a full push when its interval has;
3. run the queued runs, then push the changes that have been quiet for the coalescing
   period (or waited the longest delay allowed).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select

from memberhub.crm import sync
from memberhub.crm.mapping import EntityType
from memberhub.crm.models import CrmSyncState, RunStatus, SyncRun
from memberhub.events.models import Event
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.leads.models import Lead
from memberhub.members.models import Member

log = structlog.get_logger("memberhub.crm.jobs")

EVENTS_PER_TICK = 5000
MEMBER_EVENTS = frozenset(
    {
        "member.created",
        "member.updated",
        "member.consent_changed",
        "member.status.changed",
        "member.tier.changed",
        "member.payment.changed",
        "points.earned",
        "points.redeemed",
        "points.deducted",
        "points.adjusted",
        "points.expired",
    }
)
LEAD_EVENTS = frozenset({"lead.created", "lead.updated"})
ENROLLED = "enrollment.completed"  # the lead became enrolled; its member was created


async def run_crm_sync(db: Database, hub: IntegrationHub, now: datetime) -> int:
    """One pass over every CRM integration; returns how many runs finished."""
    async with db.transaction(read_only=True) as session:
        integrations = list(
            await session.scalars(
                select(Integration).where(Integration.enabled.is_(True)).order_by(Integration.id)
            )
        )
    finished = 0
    for integration in integrations:
        found = sync.crm_of(integration)
        if found is None:
            continue
        try:
            finished += await _tick_integration(db, hub, integration, now)
        except Exception:
            log.exception("crm_sync_tick_failed", integration=integration.public_id)
    return finished


async def _tick_integration(
    db: Database, hub: IntegrationHub, integration: Integration, now: datetime
) -> int:
    found = sync.crm_of(integration)
    assert found is not None
    _crm, settings = found
    entities = [entity for entity, _ in settings.objects()]
    async with db.transaction() as session:
        state = await sync.ensure_state(session, integration.id)
        purged = False
        if settings.push:
            purged = await _mark_changes(session, integration, state, entities)
        else:
            state.event_position = await _latest_position(session)
        queued = set(
            await session.scalars(
                select(SyncRun.mode).where(
                    SyncRun.integration_id == integration.id,
                    SyncRun.status.in_((RunStatus.QUEUED, RunStatus.RUNNING)),
                )
            )
        )
        if purged and "push" not in queued:
            # What the purged events changed is unknown: a full push compares everything.
            log.warning("crm_feed_purged_behind_position", integration=integration.public_id)
            session.add(
                sync.new_run(
                    integration, mode="push", trigger="gap", dry_run=False, requested_by="worker"
                )
            )
            queued.add("push")
        if (
            settings.pull
            and "pull" not in queued
            and _due(state.last_pull_at, settings.pull_interval_seconds, now)
        ):
            session.add(_scheduled(integration, "pull"))
            state.last_pull_at = now
        if (
            settings.push
            and settings.full_push_interval_hours > 0
            and "push" not in queued
            and state.last_full_push_at is not None
            and _due(state.last_full_push_at, settings.full_push_interval_hours * 3600, now)
        ):
            session.add(_scheduled(integration, "push"))
            state.last_full_push_at = now
        if state.last_full_push_at is None:
            state.last_full_push_at = now  # the first full push is started by hand
    finished = await run_queued(db, hub, integration.id)
    if settings.push:
        ctx = await sync.context_for(db, hub, integration)
        if ctx is not None:
            async with db.transaction() as session:
                due = await sync.has_due_changes(session, ctx, utcnow())
                run = None
                waiting = await session.scalar(
                    select(SyncRun.id).where(
                        SyncRun.integration_id == integration.id,
                        SyncRun.trigger == "changes",
                        SyncRun.status.in_((RunStatus.QUEUED, RunStatus.RUNNING)),
                    )
                )
                if due and waiting is None:
                    run = sync.new_run(
                        integration,
                        mode="push",
                        trigger="changes",
                        dry_run=False,
                        requested_by="worker",
                    )
                    session.add(run)
                    await session.flush()
                    run_id = run.id
            if run is not None and await sync.execute(db, hub, run_id) is not None:
                finished += 1
    return finished


def _due(last: datetime | None, every_seconds: float, now: datetime) -> bool:
    return last is None or now - last >= timedelta(seconds=every_seconds)


def _scheduled(integration: Integration, mode: str) -> SyncRun:
    return sync.new_run(
        integration, mode=mode, trigger="schedule", dry_run=False, requested_by="worker"
    )


async def run_queued(db: Database, hub: IntegrationHub, integration_id: int) -> int:
    finished = 0
    while True:
        async with db.transaction(read_only=True) as session:
            run_id = await session.scalar(
                select(SyncRun.id)
                .where(SyncRun.integration_id == integration_id, SyncRun.status == RunStatus.QUEUED)
                .order_by(SyncRun.id)
                .limit(1)
            )
        if run_id is None:
            return finished
        if await sync.execute(db, hub, run_id) is None:
            return finished  # another worker holds the integration
        finished += 1


async def _latest_position(session: Any) -> int:
    from sqlalchemy import func

    return int(await session.scalar(select(func.max(Event.position))) or 0)


async def _mark_changes(
    session: Any, integration: Integration, state: CrmSyncState, entities: Iterable[EntityType]
) -> bool:
    """Mark what the events since the state's position changed; whether events after the
    position were purged first (RETENTION_DAYS: the integration was disabled, or its worker
    down, for longer), leaving changes nobody marked."""
    wanted = set(entities)
    rows = (
        await session.execute(
            select(Event.position, Event.type, Event.member_public_id, Event.data)
            .where(Event.position > (state.event_position or 0))
            .order_by(Event.position)
            .limit(EVENTS_PER_TICK)
        )
    ).all()
    if not rows:
        return False
    # Positions run without a gap: a first one further on means the ones between are gone.
    purged = rows[0].position != (state.event_position or 0) + 1
    state.event_position = rows[-1].position
    touched: set[tuple[EntityType, str]] = set()
    for row in rows:
        if "members" in wanted and row.type in MEMBER_EVENTS and row.member_public_id:
            touched.add(("members", row.member_public_id))
        elif "leads" in wanted and row.type in LEAD_EVENTS:
            lead = row.data.get("lead") if isinstance(row.data, dict) else None
            if isinstance(lead, dict) and isinstance(lead.get("id"), str):
                touched.add(("leads", lead["id"]))
        elif (
            "leads" in wanted
            and row.type == ENROLLED
            and isinstance(row.data, dict)
            and isinstance(row.data.get("lead_id"), str)
        ):
            touched.add(("leads", row.data["lead_id"]))
    if not touched:
        return purged
    now = utcnow()
    for entity in ("members", "leads"):
        public_ids = [pid for (kind, pid) in touched if kind == entity]
        if not public_ids:
            continue
        model: type[Member] | type[Lead] = Member if entity == "members" else Lead
        rows = await session.execute(
            select(model.public_id, model.id).where(model.public_id.in_(public_ids))
        )
        ids = {public_id: entity_id for public_id, entity_id in rows}
        links = await sync.ensure_links(session, integration.id, entity, list(ids.values()))
        for link in links.values():
            link.pending_at = now
            if link.pending_since is None:
                link.pending_since = now
    return purged
