"""The search sync as the API shows it: where each index stands, and full reindexes asked
for by hand (the worker runs them, see `search/sync.py`)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import record_write
from memberhub.auth.principal import Principal
from memberhub.integrations.models import Integration
from memberhub.integrations.service import get_integration
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, MemberhubError
from memberhub.search.models import SearchSyncState
from memberhub.search.repository import SearchRepository
from memberhub.search.schemas import SearchStatusOut
from memberhub.search.sync import Target, search_target


class NotASearchIndex(MemberhubError):
    code = "INTEGRATION_NOT_A_SEARCH_INDEX"
    status_code = 409


async def search_integration(
    session: AsyncSession, principal: Principal, public_id: str, *, for_update: bool = False
) -> Target:
    integration = await get_integration(session, principal, public_id, for_update=for_update)
    target = search_target(integration)
    if target is None:
        raise NotASearchIndex(
            f"Integration {public_id} ({integration.provider}) keeps no search index."
        )
    return target


async def status(session: AsyncSession, principal: Principal, public_id: str) -> SearchStatusOut:
    target = await search_integration(session, principal, public_id)
    repo = SearchRepository(session)
    state = await repo.state(target.integration.id)
    return _out(target, state, await repo.latest_position())


async def request_reindex(
    session: AsyncSession, principal: Principal, public_id: str
) -> SearchStatusOut:
    """Ask the worker to rebuild the integration's indices from the database."""
    target = await search_integration(session, principal, public_id, for_update=True)
    integration = target.integration
    if not integration.enabled:
        raise Conflict("The integration is disabled.", details={"integration_id": public_id})
    repo = SearchRepository(session)
    state = await repo.state(integration.id, for_update=True)
    now = utcnow()
    if state is None:
        # The worker's first claim starts at the feed's end with a reindex anyway.
        state = SearchSyncState(
            integration_id=integration.id,
            event_position=await repo.latest_position(),
            reindex_requested_at=now,
            records_saved=0,
            records_deleted=0,
            failures=0,
        )
        session.add(state)
    elif state.reindex_requested_at is None:
        state.reindex_requested_at = now
    # A reindex asked for by hand is tried at once, whatever the backoff.
    state.next_attempt_at = None
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="integration.search.reindex",
        object_type="integration",
        object_id=integration.public_id,
        changes={},
    )
    return _out(target, state, await repo.latest_position())


def _out(target: Target, state: SearchSyncState | None, latest: int) -> SearchStatusOut:
    integration: Integration = target.integration
    position = state.event_position if state is not None else None
    return SearchStatusOut(
        integration_id=integration.public_id,
        provider=integration.provider,
        indices=target.settings.indices(),
        member_directory=target.settings.member_directory is not None,
        position=position,
        latest_position=latest,
        pending_events=max(0, latest - position) if position is not None else latest,
        reindex_requested_at=state.reindex_requested_at if state else None,
        last_reindex_at=state.last_reindex_at if state else None,
        last_synced_at=state.last_synced_at if state else None,
        records_saved=state.records_saved if state else 0,
        records_deleted=state.records_deleted if state else 0,
        failures=state.failures if state else 0,
        last_error=state.last_error if state else None,
        last_error_at=state.last_error_at if state else None,
        next_attempt_at=state.next_attempt_at if state else None,
    )
