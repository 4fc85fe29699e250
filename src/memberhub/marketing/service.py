"""The marketing sync as the API shows it: where an audience stands, full comparisons
asked for by hand (the worker runs them, see `marketing/sync.py`), and dry runs that show
what a run would send without sending or recording anything."""

from __future__ import annotations

import math

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import record_write
from memberhub.auth.principal import Principal
from memberhub.integrations.service import get_integration
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, MemberhubError
from memberhub.marketing.audience import shown
from memberhub.marketing.models import MarketingSyncState
from memberhub.marketing.repository import MarketingRepository
from memberhub.marketing.schemas import (
    MarketingDryRunOut,
    MarketingStatusOut,
    MarketingSyncRequest,
    SegmentOut,
    SegmentPlanOut,
)
from memberhub.marketing.segments import plan_segments
from memberhub.marketing.sync import (
    EVENTS_PER_WINDOW,
    MEMBER_CHUNK,
    MEMBER_EVENT_PREFIXES,
    plan_members,
)
from memberhub.marketing.targets import Target, marketing_target

SHOWN_WRITES = 100


class NotAMarketingList(MemberhubError):
    code = "INTEGRATION_NOT_A_MARKETING_LIST"
    status_code = 409


async def marketing_integration(
    session: AsyncSession, principal: Principal, public_id: str, *, for_update: bool = False
) -> Target:
    integration = await get_integration(session, principal, public_id, for_update=for_update)
    target = marketing_target(integration)
    if target is None:
        raise NotAMarketingList(
            f"Integration {public_id} ({integration.provider}) keeps no marketing list."
        )
    return target


async def status(session: AsyncSession, principal: Principal, public_id: str) -> MarketingStatusOut:
    target = await marketing_integration(session, principal, public_id)
    return await _out(MarketingRepository(session), target)


async def request_sync(
    session: AsyncSession, principal: Principal, public_id: str, body: MarketingSyncRequest
) -> MarketingStatusOut | MarketingDryRunOut:
    if body.dry_run:
        target = await marketing_integration(session, principal, public_id)
        return await dry_run(MarketingRepository(session), target, full=body.full)
    target = await marketing_integration(session, principal, public_id, for_update=True)
    integration = target.integration
    if not integration.enabled:
        raise Conflict("The integration is disabled.", details={"integration_id": public_id})
    repo = MarketingRepository(session)
    state = await repo.state(integration.id, for_update=True)
    now = utcnow()
    if state is None:
        # The worker's first claim compares every member anyway.
        state = MarketingSyncState(
            integration_id=integration.id,
            event_position=await repo.latest_position(),
            full_requested_at=now,
            members_written=0,
            last_run_writes=0,
            last_run_requests=0,
            failures=0,
        )
        session.add(state)
    elif body.full and state.full_requested_at is None:
        state.full_requested_at = now
    # A run asked for by hand is tried at once, whatever the backoff.
    state.next_attempt_at = None
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="integration.marketing.sync",
        object_type="integration",
        object_id=integration.public_id,
        changes={"full": body.full},
    )
    return await _out(repo, target)


async def dry_run(repo: MarketingRepository, target: Target, *, full: bool) -> MarketingDryRunOut:
    """What a run would send now: reads only."""
    writes = []
    if full:
        after_id = 0
        planned: set[str] = set()
        while ids := await repo.member_ids(after_id=after_id, limit=MEMBER_CHUNK):
            writes.extend(await plan_members(repo, target, ids, planned))
            after_id = ids[-1]
    else:
        state = await repo.state(target.integration.id)
        position = state.event_position if state is not None else await repo.latest_position()
        events = await repo.events_after(position, EVENTS_PER_WINDOW)
        public_ids = {
            e.member_public_id
            for e in events
            if e.member_public_id and e.type.startswith(MEMBER_EVENT_PREFIXES)
        }
        ids = sorted((await repo.member_ids_by_public_id(public_ids)).values())
        writes = await plan_members(repo, target, ids)
    segments = await plan_segments(repo, target, utcnow())
    size = max(1, target.audience.batch_size)
    segment_size = max(1, target.audience.segment_batch_size)
    requests = math.ceil(len(writes) / size)
    plans = []
    for key, name, add, remove, row in segments:
        create = row is None or row.remote_id is None
        requests += int(create) + math.ceil(max(len(add), len(remove)) / segment_size)
        plans.append(
            SegmentPlanOut(key=key, name=name, create=create, add=len(add), remove=len(remove))
        )
    return MarketingDryRunOut(
        integration_id=target.integration.public_id,
        members_to_write=len(writes),
        requests=requests,
        writes=[dict(shown(w.member)) for w in writes[:SHOWN_WRITES]],
        segments=plans,
    )


async def _out(repo: MarketingRepository, target: Target) -> MarketingStatusOut:
    integration = target.integration
    state = await repo.state(integration.id)
    latest = await repo.latest_position()
    position = state.event_position if state is not None else None
    rows = await repo.segment_rows(integration.id)
    segments = [
        SegmentOut(
            key=d.key,
            name=d.name,
            remote_id=rows[d.key].remote_id if d.key in rows else None,
            members=len(rows[d.key].emails) if d.key in rows else 0,
            synced_at=rows[d.key].synced_at if d.key in rows else None,
        )
        for d in target.settings.segments
    ]
    return MarketingStatusOut(
        integration_id=integration.public_id,
        provider=integration.provider,
        list_id=target.settings.list_id,
        position=position,
        pending_events=max(0, latest - position) if position is not None else latest,
        full_requested_at=state.full_requested_at if state else None,
        last_full_sync_at=state.last_full_sync_at if state else None,
        last_synced_at=state.last_synced_at if state else None,
        members_written=state.members_written if state else 0,
        last_run_writes=state.last_run_writes if state else 0,
        last_run_requests=state.last_run_requests if state else 0,
        contacts=await repo.contact_counts(integration.id),
        journeys=await repo.firing_counts(integration.id),
        segments=segments,
        failures=state.failures if state else 0,
        last_error=state.last_error if state else None,
        last_error_at=state.last_error_at if state else None,
        next_attempt_at=state.next_attempt_at if state else None,
    )
